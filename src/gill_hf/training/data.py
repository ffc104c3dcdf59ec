"""Training data: image-caption pairs (stage 1) and VIST stories as interleaved tasks (stage 2), plus collators.

Datasets return raw examples (caption / PIL images); an image that cannot be decoded is returned as ``None`` with
the error, and the collator drops that example and counts it (``collator.num_skipped``); nothing is replaced.
"""

import csv
import itertools
import json
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from ..processing_gill import load_image, to_rgb
from .targets import TargetStore

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("", ".jpg", ".jpeg", ".png", ".webp")


def _try_load(source) -> tuple[Image.Image | None, str | None]:
    try:
        return to_rgb(load_image(source)), None
    except (ValueError, FileNotFoundError, OSError) as err:
        return None, str(err)


def _resolve_image(image_dir: str | None, name: str) -> str:
    """``image_dir/name``, trying the usual extensions when ``name`` has none (VIST ids, CC3M keys)."""
    base = name if image_dir is None or os.path.isabs(name) else os.path.join(image_dir, name)
    for ext in IMAGE_EXTENSIONS:
        if os.path.exists(base + ext):
            return base + ext
    return base  # missing: reported when loaded


# ---------------------------------------------------------------------------------------------------- stage 1
class CaptionImageDataset(Dataset):
    """Image-caption pairs; item ``i`` -> ``{"index", "caption", "image" (PIL RGB or None), "error"}``.

    Build with :meth:`from_tsv` (CC3M-style ``caption<TAB>image``) or :meth:`from_hf_dataset`.
    """

    def __init__(self, captions: list[str], images: list, image_dir: str | None = None):
        if len(captions) != len(images):
            raise ValueError(f"{len(captions)} captions but {len(images)} images")
        self.captions, self.images, self.image_dir = list(captions), list(images), image_dir

    @classmethod
    def from_tsv(cls, path: str | os.PathLike, image_dir: str | None = None, caption_column: str = "caption",
                 image_column: str = "image") -> "CaptionImageDataset":
        """Read a TSV with a header naming ``caption_column`` and ``image_column`` (file names under ``image_dir``,
        default the TSV's folder)."""
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = {caption_column, image_column} - set(reader.fieldnames or [])
            if missing:
                raise ValueError(f"{path}: header {reader.fieldnames} lacks column(s) {sorted(missing)}")
            rows = [(r[caption_column], r[image_column]) for r in reader]
        if not rows:
            raise ValueError(f"{path} holds no examples")
        image_dir = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(path))
        return cls([c for c, _ in rows], [i for _, i in rows], image_dir)

    @classmethod
    def from_hf_dataset(cls, dataset, image_column: str = "image", text_column: str = "text"
                        ) -> "CaptionImageDataset":
        """Any ``datasets.Dataset`` with an image column (PIL images or paths) and a text column."""
        missing = {image_column, text_column} - set(dataset.column_names)
        if missing:
            raise ValueError(f"dataset columns {dataset.column_names} lack {sorted(missing)}")
        return _HFCaptionImageDataset(dataset, image_column, text_column)

    def __len__(self) -> int:
        return len(self.captions)

    def _image_source(self, i: int):
        image = self.images[i]
        return _resolve_image(self.image_dir, image) if isinstance(image, str) else image

    def __getitem__(self, i: int) -> dict:
        image, error = _try_load(self._image_source(i))
        return {"index": i, "caption": self.captions[i], "image": image, "error": error}


class _HFCaptionImageDataset(CaptionImageDataset):
    """Lazy view of a ``datasets`` dataset (images decoded on access)."""

    def __init__(self, dataset, image_column: str, text_column: str):
        self.dataset, self.image_column = dataset, image_column
        self.captions, self.image_dir = list(dataset[text_column]), None

    def _image_source(self, i: int):
        return self.dataset[i][self.image_column]


class _HFIterableCaptionDataset(IterableDataset):
    """A streaming ``datasets.IterableDataset`` of pairs -> the items of :class:`CaptionImageDataset` (``index``
    counts the stream; dataloader workers take every n-th example)."""

    def __init__(self, dataset, image_column: str, text_column: str):
        self.dataset, self.image_column, self.text_column = dataset, image_column, text_column

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
            image, error = _try_load(row[self.image_column])
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
    columns = dict(columns or {})
    unknown = set(columns) - {"caption", "image"}
    if unknown:
        raise ValueError(f"columns keys {sorted(unknown)} are not 'caption' / 'image'")
    names = list(dataset.column_names or [])
    caption = columns.get("caption") or ("text" if "caption" not in names and "text" in names else "caption")
    image = columns.get("image", "image")
    if isinstance(dataset, datasets.IterableDataset):
        missing = {caption, image} - set(names) if names else set()
        if missing:
            raise ValueError(f"dataset columns {names} lack {sorted(missing)}; pass columns={{'caption': ..., "
                             "'image': ...}")
        return _HFIterableCaptionDataset(dataset, image, caption)
    if {caption, image} - set(names):
        raise ValueError(f"dataset columns {names} lack {sorted({caption, image} - set(names))}; pass "
                         "columns={'caption': ..., 'image': ...}")
    return CaptionImageDataset.from_hf_dataset(dataset, image_column=image, text_column=caption)


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
    """Counts examples dropped for unreadable images and logs each one."""

    num_skipped: int = field(default=0, kw_only=True)

    def keep(self, examples: list[dict]) -> list[dict]:
        kept = []
        for ex in examples:
            if ex.get("error"):
                self.num_skipped += 1
                logger.warning("skipping example %s: %s (%d skipped so far)", ex.get("index"), ex["error"],
                               self.num_skipped)
            else:
                kept.append(ex)
        if not kept:
            raise ValueError(f"every example of this batch had an unreadable image ({len(examples)} skipped)")
        return kept


@dataclass
class GILLDataCollator(SkipCounter):
    """Stage-1 batches for ``GILLForConditionalGeneration.forward`` (+ ``ldm_pixel_values`` for the LDM loss).

    Args:
        processor: the model's ``GILLProcessor``.
        max_length: caption length incl. BOS and the r [IMG] tokens (the original: 32).
        targets: a :class:`TargetStore` (or None: no l_g); adds ``gen_targets`` and ``null_gen_target``.
        ldm_image_size: when set, adds ``ldm_pixel_values`` ``(N, 3, S, S)`` in [-1, 1].
    """

    processor: object = None
    max_length: int = 32
    targets: TargetStore | None = None
    ldm_image_size: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        examples = self.keep(examples)
        enc = self.processor.encode_captions([ex["caption"] for ex in examples], max_length=self.max_length)
        images = [ex["image"] for ex in examples]
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                 "pixel_values": self.processor.preprocess_images(images)}
        if self.targets is not None:
            batch["gen_targets"] = torch.stack([self.targets[ex["index"]] for ex in examples])  # (N, L, D)
            batch["null_gen_target"] = self.targets.null  # (L, D)
        if self.ldm_image_size:
            batch["ldm_pixel_values"] = torch.stack([ldm_pixel_values(im, self.ldm_image_size) for im in images])
        return batch


# ---------------------------------------------------------------------------------------------------- stage 2
TASKS = ("gen", "text_image", "text")  # MiniGPT-5's image-only, text+image and text-only generation tasks
TASK_INSTRUCTIONS = {
    "gen": "Generate an image with the scene description: {text}",
    "text_image": "Tell me the next scene with image.",
    "text": "Tell me the next scene description by this image:",
}


def read_vist_stories(path: str | os.PathLike) -> list[list[dict]]:
    """VIST stories -> ``[[{"text", "image"}, ...] per story]`` in story order.

    Accepts the official SIS JSON (``{"annotations": [[{"story_id", "photo_flickr_id", "text",
    "worker_arranged_photo_order"}], ...]}``) and MiniGPT-5's cleaned form (``{story_id: [{"caption", "image_id",
    "sequence_index"}]}``).
    """
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    stories: dict[str, list[tuple[int, dict]]] = {}
    if isinstance(data, dict) and "annotations" in data:
        for ann in data["annotations"]:
            ann = ann[0] if isinstance(ann, list) else ann
            step = {"text": ann["text"], "image": str(ann["photo_flickr_id"])}
            stories.setdefault(str(ann["story_id"]), []).append((int(ann["worker_arranged_photo_order"]), step))
    elif isinstance(data, dict):
        for story_id, steps in data.items():
            stories[story_id] = [(int(s["sequence_index"]), {"text": s["caption"], "image": str(s["image_id"])})
                                 for s in steps]
    else:
        raise ValueError(f"{path}: expected VIST SIS JSON (with 'annotations') or {{story_id: [steps]}}")
    if not stories:
        raise ValueError(f"{path} holds no stories")
    return [[step for _, step in sorted(steps, key=lambda t: t[0])] for steps in stories.values()]


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
        self.stories, self.image_dir, self.max_history = stories, image_dir, max_history
        self.examples = [(s, j, task) for s, story in enumerate(stories) for j in range(len(story)) for task in tasks
                         if task == "gen" or j > 0]

    @classmethod
    def from_json(cls, path: str | os.PathLike, image_dir: str | None = None, **kwargs) -> "VISTTaskDataset":
        image_dir = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(path))
        return cls(read_vist_stories(path), image_dir, **kwargs)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict:
        s, j, task = self.examples[i]
        story = self.stories[s]
        ex = {"index": i, "task": task, "context": [], "instruction": TASK_INSTRUCTIONS[task].format(
            text=story[j]["text"]), "instruction_image": None, "output_image": None,
            "target_text": "" if task == "gen" else story[j]["text"], "error": None}
        for step in story[max(0, j - self.max_history):j]:
            image, error = _try_load(_resolve_image(self.image_dir, step["image"]))
            ex["error"] = ex["error"] or error
            ex["context"] += [step["text"], image]
        image, error = _try_load(_resolve_image(self.image_dir, story[j]["image"]))
        ex["error"] = ex["error"] or error
        ex["instruction_image" if task == "text" else "output_image"] = image
        return ex


@dataclass
class InterleavedDataCollator(SkipCounter):
    """Stage-2 batches: ``input_ids``/``attention_mask``/``labels`` ``(B, T)``, context ``pixel_values``, and
    ``ldm_pixel_values`` of the output images in [IMG]-block order.

    The prompt (context + instruction) is unsupervised; the answer (text, then [IMG0..r-1] for image outputs, then
    EOS) is supervised, of the [IMG] block only [IMG0] (later [IMG] tokens are forced at inference).
    """

    processor: object = None
    max_length: int = 256
    ldm_image_size: int | None = None

    def __call__(self, examples: list[dict]) -> dict:
        examples = self.keep(examples)
        proc, tok = self.processor, self.processor.tokenizer
        img_ids = proc.img_token_ids
        rows, labels, images, outputs = [], [], [], []
        for ex in examples:
            items = ex["context"] + [ex["instruction"]] + \
                ([ex["instruction_image"]] if ex["instruction_image"] is not None else [])
            prompt = proc(items, return_tensors=None)["input_ids"][0]
            answer = tok(" " + ex["target_text"], add_special_tokens=False, split_special_tokens=True)["input_ids"] \
                if ex["target_text"] else []
            has_image = ex["output_image"] is not None
            answer = answer + (img_ids if has_image else []) + [tok.eos_token_id]
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
