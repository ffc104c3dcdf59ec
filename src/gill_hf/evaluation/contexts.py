"""Benchmark examples read from the official files, and the model inputs of each evaluation setting.

VIST (SIS JSON): the last image of a story is the target; the settings of paper Table 1 / Table 5 feed
``"1 caption"`` (the last text), ``"5 captions"`` (all five texts) or ``"5 captions, 4 images"``
(``<text1><img1>...<text4><img4><text5>``). VisDial (v1.0 JSON): the dialog's image is the target; ``n`` rounds
feed the first n Q/A pairs as ``"Q: <question>?"`` / ``"A: <answer>"`` lines joined by newlines, as the original
evaluation did (the COCO caption is not part of the input). Caption sets (FID): COCO captions JSON or a
``caption<TAB>image`` TSV.
"""

import json
import logging
import os
import random
import re
from dataclasses import dataclass

from PIL import Image

from ..processing_gill import load_image, to_rgb
from ..training.data import CaptionImageDataset, check_image_name, check_inside, read_vist_stories

logger = logging.getLogger(__name__)

VIST_SETTINGS = ("1 caption", "5 captions", "5 captions, 4 images")
VIST_SETTING_KEYS = {"1cap": "1 caption", "5cap": "5 captions", "5cap4img": "5 captions, 4 images"}  # CLI names
VIST_STEPS = 5
CONTEXT_IMAGE_SIZE = 224  # context images are resized to 224 x 224 first, as the original evaluation
VISDIAL_ROUNDS = (1, 5, 10)
MAX_VISDIAL_ROUNDS = 10
_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


@dataclass
class ImageExample:
    """One benchmark example: ``example_id`` (file-name safe), ``target`` (path of the ground-truth image) and
    what the inputs are built from: ``texts`` / ``context_images`` (VIST steps) or ``rounds`` (VisDial Q/A)."""

    example_id: str
    target: str
    texts: list[str]
    context_images: list[str]
    rounds: list[tuple[str, str]] | None = None


def _check_limit(examples: list, limit: int | None) -> list:
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return examples[:limit] if limit else examples


def _existing(image_dir: str, name: str, what: str) -> str:
    """``image_dir/name``, which must exist and stay inside ``image_dir`` (symlinks followed)."""
    path = os.path.join(image_dir, check_image_name(name, what))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: image file {path} does not exist")
    return _inside(image_dir, path, what)


def _inside(image_dir: str, path: str, what: str) -> str:
    try:
        return check_inside(image_dir, path)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def _find_image(image_dir: str, name: str, what: str) -> str:
    """``image_dir/name`` with any usual image suffix; a missing file, or a name or symlink leaving
    ``image_dir``, raises naming the path."""
    base = os.path.join(image_dir, check_image_name(name, what))
    for suffix in ("",) + _IMAGE_SUFFIXES:
        if os.path.isfile(base + suffix):
            return _inside(image_dir, base + suffix, what)
    raise FileNotFoundError(f"{what}: no image file {base}[.jpg|.png] in {image_dir}")


# ---------------------------------------------------------------------------------------------------- VIST
def load_vist(annotations: str | os.PathLike, image_dir: str | os.PathLike, limit: int | None = None
              ) -> list[ImageExample]:
    """The first ``limit`` stories of an SIS JSON; every image is checked to exist (the error names it)."""
    stories = _check_limit(read_vist_stories(annotations), limit)
    examples = []
    for i, story in enumerate(stories):
        if len(story) < VIST_STEPS:
            raise ValueError(f"{os.fspath(annotations)}: story {i} has {len(story)} steps; VIST evaluation needs "
                             f"{VIST_STEPS} (4 context steps and the target)")
        story = story[-VIST_STEPS:]
        paths = [_find_image(os.fspath(image_dir), step["image"], f"story {i}") for step in story]
        examples.append(ImageExample(f"{i:05d}-{story[-1]['image']}", paths[-1], [s["text"] for s in story],
                                     paths[:-1]))
    return examples


def context_image(path: str) -> Image.Image:
    return to_rgb(load_image(path)).resize((CONTEXT_IMAGE_SIZE, CONTEXT_IMAGE_SIZE), Image.BICUBIC)


def vist_context(example: ImageExample, setting: str) -> list:
    """GILL's interleaved input (str / PIL items) for one VIST setting."""
    if setting == "1 caption":
        return [example.texts[-1]]
    if setting == "5 captions":
        return [" ".join(example.texts)]
    if setting == "5 captions, 4 images":
        items = []
        for text, path in zip(example.texts, example.context_images):
            items += [text, context_image(path)]
        return items + [example.texts[-1]]
    raise ValueError(f"unknown VIST setting {setting!r}; choose from {VIST_SETTINGS}")


def context_text(context: list) -> str:
    """The text of an input (what a text-only model such as Stable Diffusion gets)."""
    return " ".join(part for part in context if isinstance(part, str))


# ---------------------------------------------------------------------------------------------------- VisDial
def _visdial_images(image_dir: str) -> dict[int, str]:
    """image_id -> file, for ``<id>.jpg`` and official names such as ``VisualDialog_val2018_000000000123.jpg``."""
    found = {}
    for name in sorted(os.listdir(image_dir)):
        stem, suffix = os.path.splitext(name)
        match = re.search(r"(\d+)$", stem)
        if match and suffix.lower() in _IMAGE_SUFFIXES:
            found.setdefault(int(match.group(1)), os.path.join(image_dir, name))
    return found


def load_visdial(annotations: str | os.PathLike, image_dir: str | os.PathLike, limit: int | None = None,
                 ) -> list[ImageExample]:
    """The first ``limit`` dialogs of a VisDial v1.0 JSON with their image (found by image id)."""
    with open(annotations, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict) or not isinstance(data.get("data"), dict):
        raise ValueError(f"{os.fspath(annotations)}: not a VisDial v1.0 file (expected a top-level "  # noqa: TRY004
                         f"'data' object with 'dialogs', 'questions', 'answers')")
    body = data["data"]
    missing = {"dialogs", "questions", "answers"} - set(body)
    if missing:
        raise ValueError(f"{os.fspath(annotations)}: 'data' lacks {sorted(missing)}")
    images = _visdial_images(os.fspath(image_dir))
    examples = []
    for i, dialog in enumerate(_check_limit(body["dialogs"], limit)):
        _require(dialog, ("image_id", "dialog"), f"{os.fspath(annotations)}, dialogs[{i}]")
        image_id = int(dialog["image_id"])
        if image_id not in images:
            raise FileNotFoundError(f"dialog of image {image_id}: no image file {image_id}.jpg / "
                                    f"VisualDialog_<split>_{image_id:012d}.jpg in {os.fspath(image_dir)}")
        rounds = [_visdial_round(body, turn, f"{os.fspath(annotations)}, dialog of image {image_id}, round {j}")
                  for j, turn in enumerate(dialog["dialog"]) if "answer" in turn]
        examples.append(ImageExample(str(image_id), images[image_id], [dialog.get("caption", "")], [], rounds))
    return examples


def _visdial_round(body: dict, turn: dict, where: str) -> tuple[str, str]:
    """(question, answer) texts of one answered round (indices into the file's question / answer lists)."""
    _require(turn, ("question", "answer"), where)
    try:
        return body["questions"][turn["question"]], body["answers"][turn["answer"]]
    except (IndexError, TypeError):
        raise ValueError(f"{where}: question {turn['question']!r} / answer {turn['answer']!r} is not an index of "
                         f"the file's {len(body['questions'])} questions / {len(body['answers'])} answers") from None


def _require(entry, keys: tuple[str, ...], where: str) -> dict:
    """``entry`` when it is an object holding ``keys``; else a ``ValueError`` naming ``where`` and what lacks."""
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: a {type(entry).__name__} instead of an object with {list(keys)}")
    missing = [key for key in keys if key not in entry]
    if missing:
        raise ValueError(f"{where} lacks field(s) {missing}; it has {sorted(entry)}")
    return entry


def visdial_context(example: ImageExample, rounds: int) -> list:
    """The first ``rounds`` Q/A pairs as one text input."""
    if not 1 <= rounds <= MAX_VISDIAL_ROUNDS:
        raise ValueError(f"rounds must be in 1..{MAX_VISDIAL_ROUNDS}, got {rounds}")
    if len(example.rounds) < rounds:
        raise ValueError(f"dialog {example.example_id} has {len(example.rounds)} answered rounds, {rounds} asked")
    lines = []
    for question, answer in example.rounds[:rounds]:
        lines += [f"Q: {question.rstrip('?')}?", f"A: {answer}"]
    return ["\n".join(lines)]


def rounds_setting(rounds: int) -> str:
    return f"{rounds} round" + ("s" if rounds > 1 else "")


# ---------------------------------------------------------------------------------------------------- captions
def load_caption_set(captions: str | os.PathLike, image_dir: str | os.PathLike | None = None,
                     limit: int | None = None, sample: int | None = None, sample_seed: int = 0) -> list[ImageExample]:
    """Caption / reference-image pairs from a COCO captions JSON (first caption of each image, in annotation
    order) or a ``caption<TAB>image`` TSV with a header; images under ``image_dir`` (default: the file's folder).
    ``sample``: that many pairs drawn at random (``sample_seed``), the paper's "30k random captions" protocol;
    ``limit``: the first pairs (after sampling)."""
    path = os.fspath(captions)
    image_dir = os.fspath(image_dir) if image_dir is not None else os.path.dirname(os.path.abspath(path))
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if not isinstance(data, dict) or not {"annotations", "images"} <= set(data):
            raise ValueError(f"{path}: not a COCO captions file (expected 'annotations' and 'images')")
        files = {_require(image, ("id", "file_name"), f"{path}, images[{i}]")["id"]: image["file_name"]
                 for i, image in enumerate(data["images"])}
        pairs, seen, blank = [], set(), 0
        for i, ann in enumerate(data["annotations"]):
            _require(ann, ("image_id", "caption"), f"{path}, annotations[{i}]")
            if ann["image_id"] in seen:
                continue
            if ann["image_id"] not in files:
                raise ValueError(f"{path}: caption of image {ann['image_id']} which 'images' does not list")
            if not isinstance(ann["caption"], str):
                raise ValueError(f"{path}, annotations[{i}]: 'caption' is a {type(ann['caption']).__name__}, "
                                 f"expected a str")
            if not ann["caption"].strip():  # skipped as in training data; the image's next caption is taken
                blank += 1
                continue
            seen.add(ann["image_id"])
            pairs.append((f"{ann['image_id']}", ann["caption"].strip(), files[ann["image_id"]]))
        if blank:
            logger.warning("%s: skipped %d empty caption(s)", path, blank)
    else:
        table = CaptionImageDataset.from_tsv(path, image_dir)
        pairs = [(f"{i:06d}", caption, image) for i, (caption, image) in enumerate(zip(table.captions, table.images))]
    if sample is not None:
        if not 1 <= sample <= len(pairs):
            raise ValueError(f"--sample must be in 1..{len(pairs)} (the captioned images of {path}), got {sample}")
        pairs = random.Random(sample_seed).sample(pairs, sample)
    return [ImageExample(key, _existing(image_dir, image, f"{path}, caption {key}"), [caption], [])
            for key, caption, image in _check_limit(pairs, limit)]
