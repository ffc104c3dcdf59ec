"""Resumable stores of generated images (``<root>/images/<row>/<seed>/<example_id>.png``), texts and
(text, image) responses.

Every item is written to a temporary file in its folder and renamed into place, so an interrupted run leaves
only complete files; a rerun loads them instead of generating again.
"""

import json
import os
import re
from collections.abc import Callable, Sequence

from PIL import Image
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_text_atomic

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(text: str) -> str:
    """A folder/file name for a row or example id ("5 captions, 4 images" -> "5_captions_4_images")."""
    return _SAFE.sub("_", text).strip("_") or "_"


class ImageStore:
    """Generated images of an evaluation run, keyed by (row, seed, example id)."""

    folder, suffix = "images", ".png"

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.join(os.fspath(root), self.folder)
        self.num_generated = self.num_reused = 0

    def path(self, row: str, seed: int | str, example_id: str) -> str:
        return os.path.join(self.root, safe_name(row), str(seed), safe_name(example_id) + self.suffix)

    @staticmethod
    def save(image: Image.Image, path: str):
        with atomic_path(path, ".png") as tmp:
            image.save(tmp, format="PNG")

    def ensure(self, row: str, seed: int | str, example_ids: Sequence[str], make: Callable[[int, int], Image.Image]
               ) -> list[str]:
        """Paths of the items of ``row``/``seed``; missing ones are made by ``make(example_index, seed)``."""
        paths = [self.path(row, seed, example_id) for example_id in example_ids]
        todo = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
        self.num_reused += len(paths) - len(todo)
        for i in tqdm(todo, desc=f"{row} seed {seed}", unit="image", disable=not todo):
            self.save(make(i, seed), paths[i])
            self.num_generated += 1
        return paths


class TextStore(ImageStore):
    """Generated texts, ``<root>/texts/<row>/<seed>/<example_id>.txt`` (UTF-8), written the same way."""

    folder, suffix = "texts", ".txt"

    @staticmethod
    def save(text: str, path: str):
        write_text_atomic(path, text)

    @staticmethod
    def read(path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()


class ResponseStore(ImageStore):
    """Generated (text, image or None) answers: ``<example_id>.png`` first, then ``<example_id>.json``
    (``{"text", "image"}``), whose presence marks the answer complete."""

    folder, suffix = "responses", ".json"

    @staticmethod
    def save(response: tuple[str, Image.Image | None], path: str):
        text, image = response
        image_path = None
        if image is not None:
            image_path = path.removesuffix(".json") + ".png"
            ImageStore.save(image, image_path)
        write_text_atomic(path, json.dumps({"text": text, "image": image_path and os.path.basename(image_path)}))

    @staticmethod
    def read(path: str) -> tuple[str, str | None]:
        """(text, image path or None)."""
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        return saved["text"], saved["image"] and os.path.join(os.path.dirname(path), saved["image"])
