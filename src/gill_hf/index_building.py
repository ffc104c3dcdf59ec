"""Resumable retrieval-index building (``gill-hf build-index``) from an image folder, a TSV or webdataset shards.

A source lists its records (stored path + image) in a fixed order. They are embedded ``batch_size`` at a time, and
every ``part_size`` records (a multiple of ``batch_size``) the rows are written atomically as one part file under
``<out_dir>/.build/``. A killed run keeps its finished parts, skips their records and continues; as batches never
straddle parts, the finished index equals an uninterrupted build's bit for bit. At the end the parts become one
:class:`~gill_hf.retrieval.RetrievalIndex` (plus an optional FAISS index beside it) and ``.build/`` is removed.

Faults: a folder without images, a TSV without the image column or with a bad row, a missing or unreadable shard
raise a ``ValueError`` naming the file before any image is embedded; an image that cannot be decoded and a shard
sample without an image are skipped, logged and counted (``IndexBuild.num_skipped``), as in training data.
"""

import hashlib
import importlib.util
import inspect
import json
import logging
import os
import shutil
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import safetensors.torch
import torch
from tqdm.auto import tqdm

from .atomic import atomic_path
from .image_io import load_image, to_rgb
from .resumable import finished_prefix, start_or_resume
from .retrieval import EMBEDDINGS_FILE, FAISS_KINDS, RetrievalIndex, build_ivfpq, import_faiss

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
SHARD_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")  # img2dataset writes jpg by default
BUILD_FOLDER = ".build"
STATE_FILE = "build.json"
IVFPQ_OPTIONS = set(inspect.signature(build_ivfpq).parameters) - {"embeddings"} | {"rerank"}  # use_faiss's


@dataclass(frozen=True)
class Record:
    """One candidate: ``name`` is stored in the index; ``image`` a path or encoded bytes, or None with ``error``."""

    name: str
    image: str | bytes | None
    error: str | None = None


@dataclass(frozen=True)
class IndexBuild:
    """The finished index and the counts of records read and skipped (undecodable, or without an image)."""

    index: RetrievalIndex
    num_records: int
    num_skipped: int


class ImageFolderSource:
    """Every file with an image suffix under ``folder`` (sub-folders too), in sorted relative-path order."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        if not os.path.isdir(self.folder):
            raise ValueError(f"{self.folder} is not a folder")
        self.files = sorted(os.path.relpath(os.path.join(root, name), self.folder)
                            for root, _, names in os.walk(self.folder) for name in names
                            if name.lower().endswith(IMAGE_SUFFIXES))
        if not self.files:
            raise ValueError(f"{self.folder} holds no images (looked for {', '.join(IMAGE_SUFFIXES)} files, in "
                             f"sub-folders too)")
        self.total = len(self.files)

    def fingerprint(self) -> dict:
        return {"kind": "folder", "folder": os.path.abspath(self.folder), "files_sha256": _digest(self.files)}

    def records(self, start: int) -> Iterator[Record]:
        for name in self.files[start:]:
            path = os.path.join(self.folder, name)
            yield Record(path, path)


class TSVSource:
    """The ``image_column`` of a TAB-separated file with a header (file names under ``image_dir``, default the
    TSV's folder; names without a suffix try the usual ones, as the training data do)."""

    def __init__(self, path: str | os.PathLike, image_column: str = "image", image_dir: str | None = None):
        from .training.data import read_tsv, check_image_name

        self.path = os.fspath(path)
        header, rows = read_tsv(self.path)
        if image_column not in header:
            raise ValueError(f"{self.path}: header {header} lacks the image column {image_column!r}")
        if not rows:
            raise ValueError(f"{self.path} holds no rows")
        column = header.index(image_column)
        self.names = [check_image_name(row[column], f"{self.path}, line {line}") for line, row in rows]
        self.image_dir = image_dir if image_dir is not None else os.path.dirname(os.path.abspath(self.path))
        self.total = len(self.names)

    def fingerprint(self) -> dict:
        sha = hashlib.sha256()
        with open(self.path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                sha.update(block)
        return {"kind": "tsv", "tsv_sha256": sha.hexdigest(), "image_dir": os.path.abspath(self.image_dir)}

    def records(self, start: int) -> Iterator[Record]:
        from .training.data import resolve_image

        for name in self.names[start:]:
            try:
                path = resolve_image(self.image_dir, name)
            except ValueError as err:
                yield Record(os.path.join(self.image_dir, name), None, str(err))
                continue
            yield Record(path, path)


class WebDatasetSource:
    """Samples of webdataset shards (tars of ``key.jpg`` / ``key.txt`` / ``key.json`` as img2dataset writes them),
    shard after shard in the order given. A sample's stored name is its json ``url`` when present, else
    ``shard#key``. Needs ``pip install gill-hf[webdataset]``."""

    def __init__(self, shards: Sequence[str | os.PathLike]):
        if importlib.util.find_spec("webdataset") is None:  # an ImportError before the model loads
            raise ImportError("reading webdataset shards needs pip install gill-hf[webdataset]")
        self.shards = [os.fspath(shard) for shard in shards]
        if not self.shards:
            raise ValueError("no webdataset shards given")
        for shard in self.shards:
            if not os.path.isfile(shard):
                raise ValueError(f"webdataset shard {shard}: no such file")
            if not tarfile.is_tarfile(shard):
                raise ValueError(f"webdataset shard {shard} is not a tar file")
        self.total = None  # known only once every shard is read

    def fingerprint(self) -> dict:
        return {"kind": "webdataset", "shards": [[os.path.abspath(s), os.path.getsize(s)] for s in self.shards]}

    def records(self, start: int) -> Iterator[Record]:
        seen = 0
        for shard in self.shards:
            for sample in shard_samples(shard):
                seen += 1
                if seen > start:
                    yield _shard_record(shard, sample)


def shard_samples(shard: str) -> Iterator[dict]:
    """The samples of one tar shard (webdataset's grouping by key), the file closed when done."""
    from webdataset import tariterators

    with open(shard, "rb") as handle:
        try:
            files = ({**entry, "__url__": shard} for entry in tariterators.tar_file_iterator(handle))
            yield from tariterators.group_by_keys(files)
        except (tarfile.TarError, OSError, ValueError) as err:
            raise ValueError(f"webdataset shard {shard} cannot be read: {err}") from err


def _shard_record(shard: str, sample: dict) -> Record:
    key = sample["__key__"]
    name = f"{shard}#{key}"
    try:
        url = json.loads(sample["json"]).get("url") if "json" in sample else None
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        return Record(name, None, f"sample {name}: unreadable json ({err})")
    name = url if isinstance(url, str) and url else name
    image = next((sample[k] for k in SHARD_IMAGE_KEYS if k in sample), None)
    if image is None:
        return Record(name, None, f"sample {shard}#{key} has no image (files: {sorted(sample)[:8]})")
    return Record(name, image)


def open_source(images: str | None = None, tsv: str | None = None, shards: Sequence[str] | None = None,
                image_column: str = "image", image_dir: str | None = None):
    """The one source given: an image folder, a TSV (``image_column`` under ``image_dir``) or webdataset shards."""
    given = [name for name, value in (("images", images), ("tsv", tsv), ("shards", shards)) if value]
    if len(given) != 1:
        raise ValueError(f"give exactly one of images, tsv, shards; got {given or 'none'}")
    if images:
        return ImageFolderSource(images)
    if tsv:
        return TSVSource(tsv, image_column, image_dir)
    return WebDatasetSource(shards)


def build_index(embed: Callable[[list], torch.Tensor], source, out_dir: str | os.PathLike, *,
                logit_scale: float = 0.0, batch_size: int = 64, part_size: int = 4096,
                dtype: torch.dtype = torch.float16, faiss: str | None = None, faiss_options: dict | None = None,
                progress: bool = True) -> IndexBuild:
    """Embed every record of ``source`` into a :class:`RetrievalIndex` saved at ``out_dir`` (resumes a killed run).

    ``embed``: RGB PIL images -> ``(n, p)`` unit-norm rows (e.g. ``partial(embed_images, model)``);
    ``logit_scale`` the model's (scores = exp(it) * cosine); ``part_size`` records per resumable part, a multiple
    of ``batch_size``; ``faiss``: also save a FAISS index (``"flat"``, ``"fp16"`` or ``"ivfpq"``, ``faiss_options``
    for the latter, see :func:`~gill_hf.retrieval.build_ivfpq`).
    """
    out_dir = os.fspath(out_dir)
    _check_settings(batch_size, part_size, dtype, faiss, faiss_options, out_dir)
    build_dir = os.path.join(out_dir, BUILD_FOLDER)
    state = {"source": source.fingerprint(), "batch_size": batch_size, "part_size": part_size,
             "dtype": str(dtype), "logit_scale": repr(float(logit_scale))}
    start_or_resume(os.path.join(build_dir, STATE_FILE), state, "an unfinished build",
                    f"resume with the same ones, or delete {build_dir}")
    done = [_part_name(number) for number in range(finished_prefix(build_dir, _part_name))]
    bar = tqdm(total=source.total, initial=len(done) * part_size, unit="image", desc="building index",
               disable=not progress)
    records = source.records(len(done) * part_size)
    while True:
        part = [record for _, record in zip(range(part_size), records)]
        if not part:
            break
        rows, names, skipped = _embed_part(embed, part, batch_size, bar)
        _save_part(os.path.join(build_dir, _part_name(len(done))), rows.to(dtype), names, len(part), skipped)
        done.append(_part_name(len(done)))
    bar.close()
    return _finish(build_dir, out_dir, done, float(logit_scale), dtype, faiss, faiss_options or {})


def _check_settings(batch_size, part_size, dtype, faiss, faiss_options, out_dir):
    if batch_size < 1 or part_size < 1 or part_size % batch_size:
        raise ValueError(f"batch_size must be >= 1 and part_size a multiple of it, got {batch_size} and {part_size}")
    if dtype not in (torch.float16, torch.float32):
        raise ValueError(f"index dtype must be float16 or float32, got {dtype}")
    if faiss is not None and faiss not in FAISS_KINDS:
        raise ValueError(f"faiss must be None or one of {FAISS_KINDS}, got {faiss!r}")
    if faiss_options and faiss != "ivfpq":
        raise ValueError(f"faiss_options apply to faiss='ivfpq' only, got faiss={faiss!r}")
    unknown = sorted(set(faiss_options or ()) - IVFPQ_OPTIONS)
    if unknown:
        raise ValueError(f"unknown faiss_options {unknown}; expected some of {sorted(IVFPQ_OPTIONS)}")
    if faiss:
        import_faiss()  # an ImportError now, not after every image is embedded
    check_out_dir(out_dir)


def check_out_dir(out_dir: str):
    """A ``ValueError`` when ``out_dir`` holds a finished index (an unfinished build there is resumed instead)."""
    if os.path.exists(os.path.join(out_dir, EMBEDDINGS_FILE)) and not os.path.isdir(
            os.path.join(out_dir, BUILD_FOLDER)):
        raise ValueError(f"{out_dir} already holds a finished retrieval index; build into a new folder")


def _part_name(number: int) -> str:
    return f"part-{number:06d}.safetensors"


def _embed_part(embed, part: list[Record], batch_size: int, bar) -> tuple[torch.Tensor, list[str], int]:
    """The ``(n, p)`` rows and names of the usable records of one part, and how many were skipped."""
    rows, names, skipped = [], [], 0
    for start in range(0, len(part), batch_size):
        images, batch_names = [], []
        for record in part[start:start + batch_size]:
            image, error = _decoded(record)
            if error:
                skipped += 1
                logger.warning("skipping %s: %s", record.name, error)
            else:
                images.append(image)
                batch_names.append(record.name)
        if images:
            rows.append(embed(images).float().cpu())
            names += batch_names
        bar.update(len(part[start:start + batch_size]))
    return (torch.cat(rows) if rows else torch.empty(0, 0)), names, skipped


def _decoded(record: Record):
    """``(RGB image, None)`` or ``(None, error)``."""
    if record.error:
        return None, record.error
    try:
        return to_rgb(load_image(record.image)), None
    except (ValueError, TypeError) as err:
        return None, str(err)


def _save_part(file: str, rows: torch.Tensor, names: list[str], num_records: int, num_skipped: int):
    """One part (rows + names + counts), written whole or not at all."""
    tensors = {"embeddings": rows.contiguous()} if len(names) else {}
    metadata = {"names": json.dumps(names), "num_records": str(num_records), "num_skipped": str(num_skipped)}
    with atomic_path(file, ".safetensors") as staging:
        safetensors.torch.save_file(tensors, staging, metadata=metadata)


def _finish(build_dir, out_dir, parts, logit_scale, dtype, faiss, faiss_options) -> IndexBuild:
    """Join the parts into one index, save it (with FAISS when asked) and remove ``build_dir``."""
    rows, names, num_records, num_skipped = [], [], 0, 0
    for part in parts:
        file = os.path.join(build_dir, part)
        with safetensors.safe_open(file, framework="pt") as handle:
            metadata = handle.metadata()
            if "embeddings" in handle.keys():
                rows.append(handle.get_tensor("embeddings"))
        names += json.loads(metadata["names"])
        num_records += int(metadata["num_records"])
        num_skipped += int(metadata["num_skipped"])
    if not names:
        raise ValueError(f"no usable image among the {num_records} records ({num_skipped} skipped; see the "
                         f"warnings)")
    index = RetrievalIndex(torch.cat(rows), names, logit_scale, dtype=dtype, normalized=True)
    if faiss:
        index.use_faiss(faiss, **faiss_options)
    index.save(out_dir)
    shutil.rmtree(build_dir)
    if num_skipped:
        logger.warning("built the index from %d of %d records: %d skipped (each one logged)", len(names),
                       num_records, num_skipped)
    return IndexBuild(index, num_records, num_skipped)


def _digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()
