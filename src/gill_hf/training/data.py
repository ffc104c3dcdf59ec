"""Training data: image-caption pairs (stage 1) and VIST stories as interleaved tasks (stage 2), plus collators.

Faults are sorted in two classes:

* found when a file is read, before any model loads, and raised as one ``ValueError`` naming the file and the
  line / story: a TSV row whose field count differs from the header (a missing TAB, or a TAB inside a caption),
  an empty image field, a VIST annotation lacking a field or holding a wrong type, an image path that leaves the
  image folder (absolute, or ``..`` reaching above it). These mean the file is not what the reader takes it for.
* skipped and counted: an empty (or missing) caption / VIST text (web corpora hold a few empty alt-texts; such an
  example has nothing to learn from, and one should not stop a long run) is dropped when the file is read, with
  one warning naming the lines / stories; an image that cannot be decoded (broken file, decompression bomb over
  ``PIL.Image.MAX_IMAGE_PIXELS``, 0-px side, extreme aspect ratio, a symlink out of the image folder) is found
  when the example is loaded: the dataset returns it with ``image=None`` and the error, or the collator meets it
  while decoding, and the collator drops that example alone, logs it and counts it (``num_skipped`` of
  ``num_seen``); :class:`SkippedExamplesCallback` logs the counts after every epoch and at the end of training.
  Nothing is replaced.
"""

import csv
import itertools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info
from transformers import TrainerCallback

from ..chat_templates import MINIGPT5_STOP, minigpt5_dialogue_prompt, minigpt5_story_prompt, placeholder_parts
from ..processing_gill import load_image, to_rgb
from .targets import TargetStore

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("", ".jpg", ".jpeg", ".png", ".webp")
_LISTED = 10  # lines / stories named in a skip warning


def _try_load(source) -> tuple[Image.Image | None, str | None]:
    """``(RGB image, None)`` or ``(None, error)`` for any ``load_image`` source."""
    try:
        return _rgb(source), None
    except (ValueError, TypeError) as err:
        return None, str(err)


def _try_load_file(image_dir: str | None, name: str) -> tuple[Image.Image | None, str | None]:
    """:func:`_try_load` of the file ``name`` names under ``image_dir`` (see :func:`resolve_image`)."""
    try:
        path = resolve_image(image_dir, name)
    except ValueError as err:
        return None, str(err)
    return _try_load(path)


def check_image_name(name, where: str) -> str:
    """``name`` when it is a non-empty relative path that stays inside its image folder; else a ``ValueError``
    naming ``where`` and the path (absolute paths and ``..`` reaching above the folder are refused)."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: the image path is {name!r}, expected a non-empty file name")
    if os.path.isabs(name) or os.path.normpath(name).split(os.sep)[0] == os.pardir:
        raise ValueError(f"{where}: image path {name!r} leaves the image folder (absolute paths and '..' above "
                         f"the folder are refused)")
    return name


def resolve_image(image_dir: str | None, name: str) -> str:
    """``image_dir/name``, trying the usual extensions when ``name`` has none (VIST ids, CC3M keys). With an
    ``image_dir`` the name must stay inside it, and so must the file's real path (symlinks followed)."""
    if image_dir is None:
        return next((name + ext for ext in IMAGE_EXTENSIONS if os.path.exists(name + ext)), name)
    check_image_name(name, f"image folder {image_dir}")
    base = os.path.join(image_dir, name)
    path = next((base + ext for ext in IMAGE_EXTENSIONS if os.path.exists(base + ext)), base)  # missing: on load
    return check_inside(image_dir, path)


def check_inside(image_dir: str, path: str) -> str:
    """``path`` when its real path (symlinks followed) lies inside ``image_dir``'s; else a ``ValueError``."""
    folder, real = os.path.realpath(image_dir), os.path.realpath(path)
    if os.path.commonpath([folder, real]) != folder:
        raise ValueError(f"image {path!r} resolves to {real!r}, outside the image folder {folder!r}")
    return path


def _kept_captions(captions, where: str, label: Callable[[int], str]) -> list[int]:
    """Positions of the non-blank captions; blank or None ones are dropped with one warning, any other non-str is
    an error (``label(i)`` names position i: "line 7", "row 3")."""
    kept, blank = [], []
    for i, caption in enumerate(captions):
        if caption is not None and not isinstance(caption, str):
            raise ValueError(f"{where}, {label(i)}: the caption is a {type(caption).__name__}, expected a str")
        (kept if caption and caption.strip() else blank).append(i)
    if blank:
        named = ", ".join(label(i) for i in blank[:_LISTED]) + (", ..." if len(blank) > _LISTED else "")
        logger.warning("%s: skipped %d example(s) with an empty caption (%s)", where, len(blank), named)
    if not kept:
        raise ValueError(f"{where}: every caption is empty ({len(blank)} examples)")
    return kept


def _hf_image(value):
    """A ``datasets.Image(decode=False)`` value ``{"bytes", "path"}`` -> its bytes or path; others unchanged."""
    if isinstance(value, dict) and set(value) <= {"bytes", "path"}:
        return value.get("bytes") or value.get("path")
    return value


def _undecoded(dataset, image_column: str):
    """``dataset`` with its ``datasets.Image`` column left undecoded, so that gill_hf decodes (and can skip) it."""
    import datasets

    feature = (dataset.features or {}).get(image_column)
    if isinstance(feature, datasets.Image) and feature.decode:
        return dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


# ---------------------------------------------------------------------------------------------------- stage 1
class CaptionImageDataset(Dataset):
    """Image-caption pairs; item ``i`` -> ``{"index", "caption", "image" (PIL RGB or None), "error"}``.

    Build with :meth:`from_tsv` (CC3M-style ``caption<TAB>image``) or :meth:`from_hf_dataset`. Empty captions are
    dropped (``num_skipped_captions``); with ``image_dir``, image names must stay inside it.
    """

    def __init__(self, captions: list[str], images: list, image_dir: str | None = None):
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions but {len(images)} images")
        kept = _kept_captions(captions, type(self).__name__, lambda i: f"example {i}")
        if image_dir is not None:
            for i in kept:
                if isinstance(images[i], str):
                    check_image_name(images[i], f"example {i}")
        self.captions, self.images = [captions[i] for i in kept], [images[i] for i in kept]
        self.image_dir, self.num_skipped_captions = image_dir, len(captions) - len(kept)

    @classmethod
    def from_tsv(cls, path: str | os.PathLike, image_dir: str | None = None, caption_column: str = "caption",
                 image_column: str = "image") -> "CaptionImageDataset":
        """Read a TSV with a header naming ``caption_column`` and ``image_column`` (file names under ``image_dir``,
        default the TSV's folder). Structural faults raise naming the line; empty captions are skipped."""
        path = os.fspath(path)
        header, rows = read_tsv(path)
        missing = {caption_column, image_column} - set(header)
        if missing:
            raise ValueError(f"{path}: header {header} lacks column(s) {sorted(missing)}")
        c, i = header.index(caption_column), header.index(image_column)
        if not rows:
            raise ValueError(f"{path} holds no examples")
        lines = [line for line, _ in rows]
        kept = _kept_captions([row[c] for _, row in rows], path, lambda j: f"line {lines[j]}")
        for j in kept:
            check_image_name(rows[j][1][i], f"{path}, line {lines[j]}")
        image_dir = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(path))
        dataset = cls([rows[j][1][c] for j in kept], [rows[j][1][i] for j in kept], image_dir)
        dataset.num_skipped_captions = len(rows) - len(kept)
        return dataset

    @classmethod
    def from_hf_dataset(cls, dataset, image_column: str = "image", text_column: str = "text"
                        ) -> "CaptionImageDataset":
        """Any ``datasets.Dataset`` with an image column (images or paths, decoded here) and a text column."""
        missing = {image_column, text_column} - set(dataset.column_names)
        if missing:
            raise ValueError(f"dataset columns {dataset.column_names} lack {sorted(missing)}")
        return _HFCaptionImageDataset(dataset, image_column, text_column)

    def __len__(self) -> int:
        return len(self.captions)

    def _load(self, i: int) -> tuple[Image.Image | None, str | None]:
        image = self.images[i]
        return _try_load_file(self.image_dir, image) if isinstance(image, str) else _try_load(image)

    def __getitem__(self, i: int) -> dict:
        image, error = self._load(i)
        return {"index": i, "caption": self.captions[i], "image": image, "error": error}


def read_tsv(path: str) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and ``(line number, fields)`` rows of a TAB-separated file (no quoting); blank lines are ignored and a
    row whose field count differs from the header's is an error naming its line."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            header = next(reader, [])
            rows = [(reader.line_num, row) for row in reader if row]
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from err
    for line, row in rows:
        if len(row) != len(header):
            raise ValueError(f"{path}, line {line}: {len(row)} TAB-separated field(s) where the header {header} has "
                             f"{len(header)} (a missing TAB, or a TAB inside a caption)")
    return header, rows


class _HFCaptionImageDataset(CaptionImageDataset):
    """Lazy view of a ``datasets`` dataset (images decoded on access, by gill_hf; empty captions dropped)."""

    def __init__(self, dataset, image_column: str, text_column: str):
        self.dataset, self.image_column = _undecoded(dataset, image_column), image_column
        captions = dataset[text_column]
        self.rows = _kept_captions(captions, f"dataset column {text_column!r}", lambda i: f"row {i}")
        self.captions, self.image_dir = [captions[i] for i in self.rows], None
        self.num_skipped_captions = len(captions) - len(self.rows)

    def _load(self, i: int) -> tuple[Image.Image | None, str | None]:
        return _try_load(_hf_image(self.dataset[self.rows[i]][self.image_column]))


class _HFIterableCaptionDataset(IterableDataset):
    """A streaming ``datasets.IterableDataset`` of pairs -> the items of :class:`CaptionImageDataset` (``index``
    counts the stream; dataloader workers take every n-th example)."""

    def __init__(self, dataset, image_column: str, text_column: str):
        self.dataset, self.image_column, self.text_column = _undecoded(dataset, image_column), image_column, text_column

    def __iter__(self):
        worker = get_worker_info()
        stream = enumerate(self.dataset)
        if worker is not None and worker.num_workers > 1:
            stream = itertools.islice(stream, worker.id, None, worker.num_workers)
        for i, row in stream:
            missing = {self.image_column, self.text_column} - set(row)
            if missing:
                raise ValueError(f"streamed example {i} lacks column(s) {sorted(missing)}; it has {sorted(row)} "
                                 "(pass columns={'caption': ..., 'image': ...})")
            image, error = _try_load(_hf_image(row[self.image_column]))
            yield {"index": i, "caption": row[self.text_column], "image": image, "error": error}


def as_caption_dataset(dataset, columns: dict[str, str] | None = None):
    """A ``datasets.Dataset`` / ``IterableDataset`` of image-caption pairs -> a dataset of collator items;
    anything else is returned unchanged. ``columns`` maps ``caption`` / ``image`` to the dataset's column names
    (default: ``caption`` or else ``text``, and ``image``)."""
    import datasets

    if not isinstance(dataset, (datasets.Dataset, datasets.IterableDataset)):
        if columns:
            raise ValueError("columns= maps the columns of a datasets.Dataset / IterableDataset; this dataset is a "
                             f"{type(dataset).__name__}")
        return dataset
    caption, image = caption_image_columns(dataset, columns)
    if isinstance(dataset, datasets.IterableDataset):
        return _HFIterableCaptionDataset(dataset, image, caption)
    return CaptionImageDataset.from_hf_dataset(dataset, image_column=image, text_column=caption)


def caption_image_columns(dataset, columns: dict[str, str] | None) -> tuple[str, str]:
    """The ``(caption, image)`` column names of a ``datasets`` dataset (see :func:`as_caption_dataset`), checked
    against its columns where they are known (a streamed dataset may not list them)."""
    columns = dict(columns or {})
    unknown = set(columns) - {"caption", "image"}
    if unknown:
        raise ValueError(f"columns keys {sorted(unknown)} are not 'caption' / 'image'")
    names = list(dataset.column_names or [])
    caption = columns.get("caption") or ("text" if "caption" not in names and "text" in names else "caption")
    image = columns.get("image", "image")
    missing = {caption, image} - set(names) if names else set()
    if missing:
        raise ValueError(f"dataset columns {names} lack {sorted(missing)}; pass columns={{'caption': ..., "
                         "'image': ...}")
    return caption, image


def ldm_pixel_values(image: Image.Image, size: int) -> torch.Tensor:
    """MiniGPT-5's VAE input: pad to a white square, resize to ``size``, scale to [-1, 1] -> ``(3, size, size)``."""
    image = to_rgb(image)
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    array = np.asarray(square.resize((size, size), Image.BICUBIC), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)


@dataclass
class SkipCounter:
    """Drops examples that carry an ``error`` or fail :meth:`checked` (their images decoded here), logs each and
    counts them: ``num_skipped`` of ``num_seen`` examples (in this process)."""

    num_skipped: int = field(default=0, kw_only=True)
    num_seen: int = field(default=0, kw_only=True)

    def checked(self, example: dict) -> dict:
        """``example`` ready to batch (images decoded to RGB); a ``ValueError`` / ``TypeError`` skips it."""
        return example

    def keep(self, examples: list[dict]) -> list[dict]:
        """The usable examples, in order (at least one, else a ``ValueError``)."""
        kept = []
        for ex in examples:
            error = ex.get("error")
            if not error:
                try:
                    kept.append(self.checked(ex))
                    continue
                except (ValueError, TypeError) as err:
                    error = str(err)
            self.num_skipped += 1
            logger.warning("skipping example %s: %s (%d skipped so far)", ex.get("index"), error, self.num_skipped)
        self.num_seen += len(examples)
        if not kept:
            raise ValueError(f"every example of this batch was skipped ({len(examples)} skipped; see the warnings): "
                             f"too many unusable examples for this batch size")
        return kept

    def summary(self) -> str:
        return f"skipped {self.num_skipped} of {self.num_seen} examples (each one logged when skipped)"


def _rgb(image):
    """A decoded RGB image from any ``load_image`` source (a no-op for RGB PIL images)."""
    return to_rgb(load_image(image))


class SkippedExamplesCallback(TrainerCallback):
    """Logs a :class:`SkipCounter` collator's counts after every epoch and at the end of training (a warning when
    examples were skipped). With ``dataloader_num_workers > 0`` the collator runs in the workers: they log each
    skip themselves and this process's counts stay 0, which the summary says."""

    def __init__(self, counter: SkipCounter):
        self.counter = counter
        self._epoch_start = (0, 0)  # (skipped, seen) when the epoch began

    def on_epoch_begin(self, args, state, control, **kwargs):
        self._epoch_start = (self.counter.num_skipped, self.counter.num_seen)

    def on_epoch_end(self, args, state, control, **kwargs):
        skipped, seen = (now - then for now, then in zip((self.counter.num_skipped, self.counter.num_seen),
                                                         self._epoch_start))
        self._log(args, f"epoch {state.epoch:g}: skipped {skipped} of {seen} examples", skipped)

    def on_train_end(self, args, state, control, **kwargs):
        self._log(args, f"training: {self.counter.summary()}", self.counter.num_skipped)

    @staticmethod
    def _log(args, message: str, skipped: int):
        if args.dataloader_num_workers > 0:
            message += (f" in the main process; the {args.dataloader_num_workers} dataloader workers log their own "
                        f"skips")
        logger.log(logging.WARNING if skipped else logging.INFO, message)


TARGET_LOOKUPS = ("index", "caption")  # GILLDataCollator.targets_by


def usable_caption(caption) -> bool:
    """A stage-1 caption worth training on (a non-blank string); others are skipped by the collator."""
    return isinstance(caption, str) and bool(caption.strip())


@dataclass
class GILLDataCollator(SkipCounter):
    """Stage-1 batches for ``GILLForConditionalGeneration.forward`` (+ ``ldm_pixel_values`` for the LDM loss).

    Args:
        processor: the model's ``GILLProcessor``.
        max_length: caption length incl. BOS and the r [IMG] tokens (the original: 32).
        targets: a :class:`TargetStore` (or None: no l_g); adds ``gen_targets`` and ``null_gen_target``.
        targets_by: how an example's row is found: ``"index"`` (its position, for a fixed-order dataset the store
            was computed for) or ``"caption"`` (its caption text, for streams; a caption the store lacks is a
            ``ValueError``, not a skip: the store does not match the data).
        ldm_image_size: when set, adds ``ldm_pixel_values`` ``(N, 3, S, S)`` in [-1, 1].
    """

    processor: object = None
    max_length: int = 32
    targets: TargetStore | None = None
    ldm_image_size: int | None = None
    targets_by: str = "index"

    def __post_init__(self):
        if self.targets_by not in TARGET_LOOKUPS:
            raise ValueError(f"targets_by must be one of {TARGET_LOOKUPS}, got {self.targets_by!r}")
        if self.targets is not None and self.targets_by == "caption":
            self.targets.check_caption_keys()

    def checked(self, example: dict) -> dict:
        caption = example["caption"]
        if not usable_caption(caption):
            raise ValueError(f"empty caption {caption!r}")
        return {**example, "image": _rgb(example["image"])}

    def _target_rows(self, examples: list[dict]):
        """The store rows of ``examples`` (see ``targets_by``)."""
        if self.targets_by == "caption":
            return self.targets.rows_for([ex["caption"] for ex in examples]).tolist()
        return [ex["index"] for ex in examples]

    def __call__(self, examples: list[dict]) -> dict:
        examples = self.keep(examples)
        enc = self.processor.encode_captions([ex["caption"] for ex in examples], max_length=self.max_length)
        images = [ex["image"] for ex in examples]
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "pixel_values": self.processor.preprocess_images(images)}
        if self.targets is not None:
            rows = self._target_rows(examples)
            batch["gen_targets"] = torch.stack([self.targets[i] for i in rows])  # (N, L, D)
            batch["null_gen_target"] = self.targets.null  # (L, D)
            if self.targets.pooled_dim is not None:  # layouts with a pooled vector (SDXL)
                batch["gen_pooled_targets"] = torch.stack([self.targets.pooled(i) for i in rows])
                batch["null_gen_pooled_target"] = self.targets.null_pooled  # (P,)
        if self.ldm_image_size:
            batch["ldm_pixel_values"] = torch.stack([ldm_pixel_values(im, self.ldm_image_size) for im in images])
        return batch


# ---------------------------------------------------------------------------------------------------- stage 2
TASKS = ("gen", "text_image", "text")  # MiniGPT-5's image-only, text+image and text-only generation tasks
PROMPT_FORMATS = ("plain", "minigpt5")  # InterleavedDataCollator.prompt_format


def check_prompt_format(prompt_format: str):
    """``prompt_format`` is one of ``PROMPT_FORMATS`` ("minigpt5": MiniGPT-5's prompt strings, "plain": the
    interleaved parts), else a ``ValueError``."""
    if prompt_format not in PROMPT_FORMATS:
        raise ValueError(f"prompt_format must be one of {list(PROMPT_FORMATS)}, got {prompt_format!r}")
TASK_INSTRUCTIONS = {
    "gen": "Generate an image with the scene description: {text}",
    "text_image": "Tell me the next scene with image.",
    "text": "Tell me the next scene description by this image:",
}


SIS_KEYS = ("worker_arranged_photo_order", "photo_flickr_id", "text")  # order, image, text (+ "story_id")
CLEANED_KEYS = ("sequence_index", "image_id", "caption")


def read_vist_stories(path: str | os.PathLike) -> list[list[dict]]:
    """VIST stories -> ``[[{"text", "image"}, ...] per story]`` in story order.

    Accepts the official SIS JSON (``{"annotations": [[{"story_id", "photo_flickr_id", "text",
    "worker_arranged_photo_order"}], ...]}``) and MiniGPT-5's cleaned form (``{story_id: [{"caption", "image_id",
    "sequence_index"}]}``). A missing field or wrong type raises naming the file and story; a story with an empty
    text is skipped (one warning names them).
    """
    return _read_vist(os.fspath(path))[0]


def _read_vist(path: str) -> tuple[list[list[dict]], list[str]]:
    """The stories of :func:`read_vist_stories` and the ids of the stories skipped for an empty text."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a JSON file: {err}") from err
    stories: dict[str, list[tuple[int, dict]]] = {}
    if isinstance(data, dict) and "annotations" in data:
        if not isinstance(data["annotations"], list):
            raise ValueError(f"{path}: 'annotations' is a {type(data['annotations']).__name__}, expected a list")
        for i, ann in enumerate(data["annotations"]):
            ann = ann[0] if isinstance(ann, list) and len(ann) == 1 else ann
            story_id = ann.get("story_id") if isinstance(ann, dict) else None
            where = f"{path}, annotation {i}" + (f" (story {story_id})" if story_id is not None else "")
            order, text, image = _vist_step(ann, ("story_id", *SIS_KEYS), where)
            stories.setdefault(str(story_id), []).append((order, {"text": text, "image": image}))
    elif isinstance(data, dict):
        for story_id, steps in data.items():
            if not isinstance(steps, list):
                raise ValueError(f"{path}, story {story_id}: {type(steps).__name__} instead of a list of steps")
            stories[story_id] = []
            for j, step in enumerate(steps):
                order, text, image = _vist_step(step, CLEANED_KEYS, f"{path}, story {story_id}, step {j}")
                stories[story_id].append((order, {"text": text, "image": image}))
    else:
        raise ValueError(f"{path}: expected VIST SIS JSON (with 'annotations') or {{story_id: [steps]}}")
    empty = [sid for sid, steps in stories.items() if any(not step["text"].strip() for _, step in steps)]
    if empty:
        named = ", ".join(empty[:_LISTED]) + (", ..." if len(empty) > _LISTED else "")
        logger.warning("%s: skipped %d stor%s with an empty text (story %s)", path, len(empty),
                       "y" if len(empty) == 1 else "ies", named)
    skipped = set(empty)
    stories = {sid: steps for sid, steps in stories.items() if sid not in skipped}
    if not stories:
        raise ValueError(f"{path} holds no stories" + (" with a text in every step" if empty else ""))
    return [[step for _, step in sorted(steps, key=lambda t: t[0])] for steps in stories.values()], empty


def _vist_step(step, keys: tuple[str, ...], where: str) -> tuple[int, str, str]:
    """``(order, text, image id)`` of one step; ``keys`` ends with its (order, image, text) keys and lists every
    required key."""
    if not isinstance(step, dict):
        raise ValueError(f"{where}: a {type(step).__name__} instead of an annotation object")
    missing = [key for key in keys if key not in step]
    if missing:
        raise ValueError(f"{where} lacks field(s) {missing}; it has {sorted(step)}")
    order_key, image_key, text_key = keys[-3:]
    order, image, text = step[order_key], step[image_key], step[text_key]
    if text is not None and not isinstance(text, str):
        raise ValueError(f"{where}: {text_key!r} is a {type(text).__name__}, expected a str")
    try:
        order = int(order)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {order_key!r} is {order!r}, expected an integer") from None
    if isinstance(image, bool) or not isinstance(image, (str, int)) or not str(image).strip():
        raise ValueError(f"{where}: {image_key!r} is {image!r}, expected an image id")
    return order, text or "", str(image)


class VISTTaskDataset(Dataset):
    """Every step of every story as one example per task (``TASKS``; tasks other than "gen" need history).

    Item -> ``{"index", "task", "context": [text, image, ...], "instruction", "instruction_image", "target_text",
    "output_image", "error"}``; for "text" the step's image is the input (``instruction_image``), for "gen" and
    "text_image" it is the output.
    """

    def __init__(self, stories: list[list[dict]], image_dir: str | None, tasks=TASKS, max_history: int = 4):
        unknown = set(tasks) - set(TASKS)
        if unknown:
            raise ValueError(f"unknown VIST task(s) {sorted(unknown)}; choose from {TASKS}")
        for s, story in enumerate(stories):
            for j, step in enumerate(story):
                _check_story_step(step, image_dir, f"story {s}, step {j}")
        self.stories, self.image_dir, self.max_history = stories, image_dir, max_history
        self.examples = [(s, j, task) for s, story in enumerate(stories) for j in range(len(story)) for task in tasks
                         if task == "gen" or j > 0]
        self.skipped_stories: list[str] = []  # ids of the stories from_json skipped for an empty text

    @classmethod
    def from_json(cls, path: str | os.PathLike, image_dir: str | None = None, **kwargs) -> "VISTTaskDataset":
        """The stories of :func:`read_vist_stories` with images under ``image_dir`` (default: the file's folder)."""
        image_dir = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(path))
        stories, skipped = _read_vist(os.fspath(path))
        dataset = cls(stories, image_dir, **kwargs)
        dataset.skipped_stories = skipped
        return dataset

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        s, j, task = self.examples[i]
        story = self.stories[s]
        ex = {"index": i, "task": task, "context": [], "instruction": TASK_INSTRUCTIONS[task].format(
            text=story[j]["text"]), "instruction_image": None, "output_image": None,
            "target_text": "" if task == "gen" else story[j]["text"], "error": None}
        for step in story[max(0, j - self.max_history):j]:
            image, error = _try_load_file(self.image_dir, step["image"])
            ex["error"] = ex["error"] or error
            ex["context"] += [step["text"], image]
        image, error = _try_load_file(self.image_dir, story[j]["image"])
        ex["error"] = ex["error"] or error
        ex["instruction_image" if task == "text" else "output_image"] = image
        return ex


def _check_story_step(step, image_dir: str | None, where: str):
    """A step is ``{"text": non-empty str, "image": file name}`` (inside ``image_dir`` when given)."""
    if not isinstance(step, dict) or not {"text", "image"} <= set(step):
        raise ValueError(f"{where}: expected {{'text': ..., 'image': ...}}, got {step!r}")
    if not isinstance(step["text"], str) or not step["text"].strip():
        raise ValueError(f"{where}: empty text {step['text']!r} (read_vist_stories skips such stories)")
    if image_dir is not None:
        check_image_name(step["image"], where)


@dataclass
class InterleavedDataCollator(SkipCounter):
    """Stage-2 batches: ``input_ids``/``attention_mask``/``labels`` ``(B, T)``, context ``pixel_values``, and
    ``ldm_pixel_values`` of the output images in [IMG]-block order.

    The prompt (context + instruction) is unsupervised; the answer (text, then [IMG0..r-1] for image outputs, then
    EOS) is supervised, of the [IMG] block only [IMG0] (later [IMG] tokens are forced at inference).

    ``prompt_format="minigpt5"`` writes MiniGPT-5's strings instead (``gill_hf.chat_templates``): VIST steps as
    ``{system}###Human:{history} {instruction} ###Assistant:``, dialogue turns (:class:`MMDialogDataset` items,
    ``task="dialogue"``) as ``{system}###Human: {text}\n###Assistant: ...`` ending in the turn's role tag, and
    answers ending in `` ###`` (its stop string) instead of EOS. ``"plain"`` (default): the parts in order.
    """

    processor: object = None
    max_length: int = 256
    ldm_image_size: int | None = None
    prompt_format: str = "plain"

    def __post_init__(self):
        check_prompt_format(self.prompt_format)

    def checked(self, example: dict) -> dict:
        decoded = {key: _rgb(example[key]) for key in ("instruction_image", "output_image")
                   if example[key] is not None}
        context = [part if isinstance(part, str) else _rgb(part) for part in example["context"]]
        return {**example, **decoded, "context": context}

    def __call__(self, examples: list[dict]) -> dict:
        examples = self.keep(examples)
        proc, tok = self.processor, self.processor.tokenizer
        img_ids = proc.img_token_ids
        minigpt5 = self.prompt_format == "minigpt5"
        end = tok(" " + MINIGPT5_STOP, add_special_tokens=False)["input_ids"] if minigpt5 else [tok.eos_token_id]
        rows, labels, images, outputs = [], [], [], []
        for ex in examples:
            items = ex["context"] + [ex["instruction"]] + \
                ([ex["instruction_image"]] if ex["instruction_image"] is not None else [])
            if minigpt5:
                # as parts, so data text that spells a special token ("</s>", "[IMG0]") stays text
                items = placeholder_parts(_minigpt5_prompt(ex), [x for x in items if isinstance(x, Image.Image)])
                prompt = proc(items, return_tensors=None)["input_ids"][0]
            else:
                prompt = proc(items, return_tensors=None)["input_ids"][0]
            answer = tok(" " + ex["target_text"], add_special_tokens=False, split_special_tokens=True)["input_ids"] \
                if ex["target_text"] else []
            has_image = ex["output_image"] is not None
            answer = answer + (img_ids if has_image else []) + end
            ids = list(prompt) + answer
            if len(ids) > self.max_length:
                raise ValueError(f"example {ex['index']} is {len(ids)} tokens, over max_length={self.max_length}; "
                                 f"raise max_length or shorten max_history")
            label = [-100] * len(prompt) + [t if t not in img_ids[1:] else -100 for t in answer]
            rows.append(ids)
            labels.append(label)
            images += [x for x in items if isinstance(x, Image.Image)]
            if has_image:
                outputs.append(ex["output_image"])
        width = max(map(len, rows))
        pad = tok.pad_token_id
        batch = {"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
                 "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows]),
                 "labels": torch.tensor([lb + [-100] * (width - len(lb)) for lb in labels])}
        if images:
            batch["pixel_values"] = proc.preprocess_images(images)
        if self.ldm_image_size and outputs:
            batch["ldm_pixel_values"] = torch.stack([ldm_pixel_values(im, self.ldm_image_size) for im in outputs])
        return batch


def _minigpt5_prompt(example: dict) -> str:
    """MiniGPT-5's prompt of a stage-2 example, ``<|image|>`` per image in the order of its image parts."""
    if example["task"] == "dialogue":
        turns = [(t["role"], t["text"], t["has_image"]) for t in example["turns"]]
        return minigpt5_dialogue_prompt(turns, example["role"])
    captions = [part for part in example["context"] if isinstance(part, str)]
    return minigpt5_story_prompt(captions, example["instruction"], example["instruction_image"] is not None)
