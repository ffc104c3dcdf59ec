"""Resumable stores of generated images (``<root>/images/<row>/<seed>/<example_id>.png``), texts and
(text, image) responses.

Every item is written to a temporary file in its folder and renamed into place, so an interrupted run leaves
only complete files; a rerun loads them instead of generating again.

Each row folder records the settings that make its items (:data:`SETTINGS_NAME`: the model's identity, diffusion
and generation options; see :meth:`ImageStore.claim`), written before its first item. A rerun with the same
settings reuses the items; other settings, or a folder holding items but no record (written before records
existed), are refused before anything is generated, so answers are never reported for settings that did not make
them.
"""

import json
import os
import re
from collections.abc import Callable, Sequence

from PIL import Image
from tqdm.auto import tqdm

from ..atomic import TEMPORARY_PREFIX, atomic_path, read_json_record, write_text_atomic

_SAFE = re.compile(r"[^A-Za-z0-9._-]+")
SETTINGS_NAME = "settings.json"  # a row folder's record of the settings that make its items


def safe_name(text: str) -> str:
    """A folder/file name for a row or example id ("5 captions, 4 images" -> "5_captions_4_images")."""
    return _SAFE.sub("_", text).strip("_") or "_"


class ImageStore:
    """Generated images of an evaluation run, keyed by (row, seed, example id)."""

    folder, suffix = "images", ".png"

    def __init__(self, root: str | os.PathLike):
        self.root = os.path.join(os.fspath(root), self.folder)
        self.num_generated = self.num_reused = 0
        self._claimed: dict[str, dict] = {}  # row -> the settings checked or recorded by this store

    def path(self, row: str, seed: int | str, example_id: str) -> str:
        return os.path.join(self.row_folder(row), str(seed), safe_name(example_id) + self.suffix)

    def row_folder(self, row: str) -> str:
        return os.path.join(self.root, safe_name(row))

    def check(self, settings: dict[str, dict]) -> dict[str, dict]:
        """Whether each row folder may take items made with its settings (a JSON-able dict): ``{row: settings}``.

        A folder without items may; one with items must hold the same record (:data:`SETTINGS_NAME`). Otherwise a
        ``ValueError`` names each refused folder with each differing field's old and new value (or the missing
        record). Writes nothing; returns the settings as JSON reads them back."""
        settings = {row: json.loads(json.dumps(value)) for row, value in settings.items()}  # tuples -> lists
        problems = [problem for row, value in settings.items() if (problem := self._problem(row, value))]
        if problems:
            raise ValueError("; ".join(problems))
        return settings

    def claim(self, settings: dict[str, dict]):
        """:meth:`check`, then tie each row folder to its settings: a folder without items records them
        (atomically, before its first item). Every row is checked before any record is written."""
        settings = self.check(settings)
        for row, value in settings.items():
            if self._claimed.get(row) != value and not _has_items(self.row_folder(row)):
                write_text_atomic(os.path.join(self.row_folder(row), SETTINGS_NAME),
                                  json.dumps(value, indent=1, sort_keys=True))
            self._claimed[row] = value

    def _problem(self, row: str, settings: dict) -> str | None:
        """Why ``row``'s folder cannot take items made with ``settings`` (None: it can)."""
        folder = self.row_folder(row)
        if self._claimed.get(row) == settings or not _has_items(folder):
            return None
        old = _read_record(os.path.join(folder, SETTINGS_NAME))
        remedy = f"use another --out (output folder), or delete {folder} to make them again"
        if old is None:
            return (f"{folder} holds answers but no {SETTINGS_NAME} (written before settings were recorded), so "
                    f"the settings that made them are unknown; {remedy}")
        if old == settings:
            return None
        changed = ", ".join(f"{key} {_shown(old, key)} -> {_shown(settings, key)}"
                            for key in sorted(set(old) | set(settings)) if old.get(key) != settings.get(key))
        return f"{folder} holds answers made with other settings ({changed}); rerun with those settings, {remedy}"

    @staticmethod
    def save(image: Image.Image, path: str):
        with atomic_path(path, ".png") as tmp:
            image.save(tmp, format="PNG")

    def ensure(self, row: str, seed: int | str, example_ids: Sequence[str], make: Callable[[int, int], Image.Image]
               ) -> list[str]:
        """Paths of the items of ``row``/``seed``; missing ones are made by ``make(example_index, seed)``. The row
        must be claimed first (:meth:`claim`)."""
        if row not in self._claimed:
            raise ValueError(f"row {row!r} of {self.root} is not claimed: call claim({{row: settings}}) before "
                             "ensure, so its items are tied to the settings that make them")
        paths = [self.path(row, seed, example_id) for example_id in example_ids]
        todo = [i for i, path in enumerate(paths) if not os.path.isfile(path)]
        self.num_reused += len(paths) - len(todo)
        for i in tqdm(todo, desc=f"{row} seed {seed}", unit="image", disable=not todo):
            self.save(make(i, seed), paths[i])
            self.num_generated += 1
        return paths


def _read_record(path: str) -> dict | None:
    """A row folder's settings record, None when it has none; an unreadable one is an ``OSError`` naming it."""
    record = read_json_record(path, "delete its folder to make its answers again")
    if record is not None and not isinstance(record, dict):
        raise OSError(f"{path} is not a settings record (a JSON object); delete its folder to make its answers again")
    return record


def _has_items(folder: str) -> bool:
    """Whether ``folder`` holds any file besides its record and temporary files."""
    return any(name != SETTINGS_NAME and not name.startswith(TEMPORARY_PREFIX)
               for _, _, names in os.walk(folder) for name in names)


def _shown(settings: dict, key: str) -> str:
    """``settings[key]`` for an error message ("(absent)" if missing); digests cut to 12 characters."""
    if key not in settings:
        return "(absent)"
    value = settings[key]
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "..."
    return repr(value)


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
