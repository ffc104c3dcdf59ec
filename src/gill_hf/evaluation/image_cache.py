"""Resumable store of generated images: ``<root>/images/<row>/<seed>/<example_id>.png``.

Every image is written to a temporary file in its folder and renamed into place, so an interrupted run leaves
only complete PNGs; a rerun loads them instead of generating again.
"""

import os
import re
from collections.abc import Callable, Sequence

from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_path

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A folder/file name for a row or example id ("5 captions, 4 images" -> "5_captions_4_images")."""
    return _SAFE.sub("_", text).strip("_") or "_"


class ImageStore:
    """Generated images of an evaluation run, keyed by (row, seed, example id)."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.join(os.fspath(root), "images")
        self.num_generated = self.num_reused = 0

    def path(self, row: str, seed: int, example_id: str) -> str:
        return os.path.join(self.root, safe_name(row), str(seed), safe_name(example_id) + ".png")

    @staticmethod
    def save(image: Image.Image, path: str):
        with atomic_path(path, ".png") as tmp:
            image.save(tmp, format="PNG")

    def ensure(self, row: str, seed: int, example_ids: Sequence[str], make: Callable[[int, int], Image.Image]
               ) -> list[str]:
        """Paths of the images of ``row``/``seed``; missing ones are made by ``make(example_index, seed)``."""
        paths = [self.path(row, seed, example_id) for example_id in example_ids]
        todo = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
        self.num_reused += len(paths) - len(todo)
        for i in tqdm(todo, desc=f"{row} seed {seed}", unit="image", disable=not todo):
            self.save(make(i, seed), paths[i])
            self.num_generated += 1
        return paths
