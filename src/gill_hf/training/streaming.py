"""Streamed stage-1 data: webdataset shards (img2dataset's tars) or a ``datasets.IterableDataset``, read as an endless,
per-process, shuffled stream that resumes exactly where a checkpoint left it.

The stream of one process (``rank`` of ``world_size``) is pass after pass over its part of the source: shards are
split by whole shards (every ``world_size``-th shard from ``rank``, as webdataset's ``split_by_node``; the shard
order reshuffled every pass when shuffling), a ``datasets`` source by ``datasets.distributed.split_dataset_by_node``;
then a seeded shuffle buffer. Items carry the image undecoded (bytes or a path): the collator decodes it and
skips-and-counts what cannot be used (no image, no caption, a broken file; see :class:`~.data.SkipCounter`), so every
raw sample takes its place in a batch and step N ends at stream position N x gradient_accumulation_steps x batch
size on every process.

Generation targets (l_g) are looked up by caption (:meth:`~.targets.TargetStore.rows_for`): precompute them from
:meth:`StreamingCaptionDataset.read_captions` (``gill-hf precompute-targets --shards / --dataset``).

Resume: :class:`~.trainer.GILLTrainer` starts a resumed stream at that position (:attr:`StreamingCaptionDataset.start`);
the stream skips the raw samples before it (no image decoded) instead of the Trainer re-collating the trained batches,
and a resumed run sees exactly the samples an uninterrupted one sees (same seed, process count and batch size).
Dataloader workers each read their process's stream and yield every ``num_workers``-th batch, so the batches are
the same whatever the worker count (each worker decodes only its own batches).
"""

import itertools
import os
import random
from collections.abc import Callable, Iterator
from functools import partial

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .data import _hf_image, _undecoded, as_caption_dataset, caption_image_columns, usable_caption

CAPTION_KEY = "txt"  # img2dataset's caption file


def find_shards(spec) -> list[str]:
    """Shard files from a brace pattern (``data/{00000..00009}.tar``), a folder (its ``*.tar``, sorted) or a list of
    either; each must be an existing tar file (a ``ValueError`` names the first that is not)."""
    from ..index_building import WebDatasetSource

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    shards = []
    for item in map(os.fspath, specs):
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name) for name in os.listdir(item) if name.endswith(".tar"))
            if not found:
                raise ValueError(f"no webdataset shards (*.tar files) in the folder {item}")
            shards += found
        else:
            shards += _brace_expanded(item)
    return WebDatasetSource(shards).shards


def _brace_expanded(pattern: str) -> list[str]:
    try:
        from braceexpand import braceexpand  # a webdataset dependency
    except ImportError:
        raise ImportError("reading webdataset shards needs pip install gill-hf[webdataset]") from None
    return list(braceexpand(pattern))


def _shard_rows(shards: list[str], rank: int, world_size: int, pass_index: int, seed: int, shuffle: bool
                ) -> Iterator[dict]:
    """One pass over this process's shards (the shard order drawn anew each pass when ``shuffle``)."""
    from ..index_building import shard_samples

    order = random.Random(f"{seed}/{pass_index}").sample(shards, len(shards)) if shuffle else shards
    for shard in order[rank::world_size]:
        for sample in shard_samples(shard):
            yield _shard_row(shard, sample)


def _shard_row(shard: str, sample: dict) -> dict:
    """``{"key", "caption", "image" (encoded bytes), "error"}`` of one shard sample."""
    from ..index_building import SHARD_IMAGE_KEYS

    key = f"{shard}#{sample['__key__']}"
    image = next((sample[name] for name in SHARD_IMAGE_KEYS if name in sample), None)
    caption, error = sample.get(CAPTION_KEY), None
    if image is None:
        error = f"sample {key} has no image (files: {sorted(sample)[:8]})"
    elif caption is None:
        error = f"sample {key} has no caption ({CAPTION_KEY} file)"
    else:
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError as err:
            caption, error = None, f"sample {key}: the caption is not UTF-8 ({err})"
    return {"key": key, "caption": caption, "image": image, "error": error}


def _hf_rows(dataset, caption: str, image: str, rank: int, world_size: int, pass_index: int) -> Iterator[dict]:
    """One pass over this process's part of a ``datasets.IterableDataset`` (``set_epoch`` reshuffles a shuffled
    one)."""
    from datasets.distributed import split_dataset_by_node

    part = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
    part.set_epoch(pass_index)
    for i, row in enumerate(part):
        missing = {caption, image} - set(row)
        if missing:
            raise ValueError(f"streamed example {i} lacks column(s) {sorted(missing)}; it has {sorted(row)} "
                             "(pass columns={'caption': ..., 'image': ...})")
        key = f"{row['__url__']}#{row['__key__']}" if {"__url__", "__key__"} <= set(row) else \
            f"rank {rank}/{world_size}, pass {pass_index}, row {i}"
        yield {"key": key, "caption": row[caption], "image": _hf_image(row[image]), "error": None}


def _shuffled(stream: Iterator[dict], size: int, rng: random.Random) -> Iterator[dict]:
    """An endless ``stream`` through a buffer of ``size`` rows: each new row takes the place of a random one, which
    is yielded."""
    buffer = list(itertools.islice(stream, size))
    for row in stream:
        j = rng.randrange(size)
        yield buffer[j]
        buffer[j] = row


class StreamingCaptionDataset(IterableDataset):
    """An endless stream of image-caption pairs for :class:`~.data.GILLDataCollator`; item -> ``{"index" (stream
    position), "key", "caption", "image" (undecoded), "error"}``. Build with :meth:`from_shards` or
    :meth:`from_hf_dataset`; ``GILLTrainer`` sets the process split and the resume position.

    Args:
        rows: ``rows(rank, world_size, pass_index)`` -> one pass over a process's part of the source.
        shuffle_buffer: rows in the shuffle buffer (0: source order).
        seed: seed of the buffer and of the per-pass shard order.
        num_shards: the source's shard count when processes read whole shards (at least one each).
    """

    def __init__(self, rows: Callable[[int, int, int], Iterator[dict]], *, shuffle_buffer: int = 0, seed: int = 0,
                 num_shards: int | None = None):
        if not isinstance(shuffle_buffer, int) or shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be an int >= 0, got {shuffle_buffer!r}")
        self.rows, self.shuffle_buffer, self.seed, self.num_shards = rows, shuffle_buffer, seed, num_shards
        self.rank, self.world_size, self.batch_size = 0, 1, 1
        self.start = 0  # raw samples of this process's stream skipped before the first item (a resumed run)

    @classmethod
    def from_shards(cls, shards, *, shuffle_buffer: int = 0, seed: int = 0) -> "StreamingCaptionDataset":
        """Webdataset shards as img2dataset writes them (``key.jpg`` / ``key.txt`` / ``key.json``): a brace pattern, a
        folder or a list (see :func:`find_shards`); with ``shuffle_buffer`` the shard order is shuffled per pass too."""
        shards = find_shards(shards)
        rows = partial(_shard_rows, shards, seed=seed, shuffle=shuffle_buffer > 0)
        return cls(rows, shuffle_buffer=shuffle_buffer, seed=seed, num_shards=len(shards))

    @classmethod
    def from_hf_dataset(cls, dataset, columns: dict[str, str] | None = None, *, shuffle_buffer: int = 0,
                        seed: int = 0) -> "StreamingCaptionDataset":
        """A ``datasets.IterableDataset`` (e.g. ``load_dataset("webdataset", ..., streaming=True)``); ``columns`` as
        :func:`~.data.as_caption_dataset`'s (for img2dataset shards: ``{"caption": "txt", "image": "jpg"}``)."""
        caption, image = caption_image_columns(dataset, columns)
        return cls(partial(_hf_rows, _undecoded(dataset, image), caption, image), shuffle_buffer=shuffle_buffer,
                   seed=seed)

    def set_split(self, rank: int, world_size: int, batch_size: int):
        """Read process ``rank`` of ``world_size``'s part, in batches of ``batch_size`` (for the workers' shares)."""
        if self.num_shards is not None and self.num_shards < world_size:
            raise ValueError(f"{self.num_shards} webdataset shard(s) for {world_size} processes: each process reads "
                             f"whole shards, so write at least {world_size} (img2dataset's number_sample_per_shard)")
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def read_captions(self) -> list[str]:
        """The usable captions of one pass over the whole source (as one process reads it), exactly as the collator
        gets them: what ``precompute_targets`` encodes for training this stream with targets (looked up by caption,
        so the order does not matter). Reads every sample once; decodes no image."""
        return [row["caption"] for row in self.rows(0, 1, 0) if usable_caption(row["caption"])]

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        workers, worker_id = (worker.num_workers, worker.id) if worker is not None else (1, 0)
        for i, row in enumerate(itertools.islice(self._stream(), self.start, None)):
            if (i // self.batch_size) % workers == worker_id:
                yield {"index": self.start + i, **row}

    def _stream(self) -> Iterator[dict]:
        rows = (row for pass_index in itertools.count() for row in self._pass(pass_index))
        if self.shuffle_buffer > 1:
            rows = _shuffled(rows, self.shuffle_buffer, random.Random(f"{self.seed}/rank {self.rank}"))
        return rows

    def _pass(self, pass_index: int) -> Iterator[dict]:
        empty = True
        for row in self.rows(self.rank, self.world_size, pass_index):
            empty = False
            yield row
        if empty:
            raise ValueError(f"process {self.rank} of {self.world_size} has no samples to read in its part of the "
                             "stream")


def as_training_dataset(dataset, columns: dict[str, str] | None = None):
    """:func:`~.data.as_caption_dataset`, except that a ``datasets.IterableDataset`` becomes a
    :class:`StreamingCaptionDataset` (endless, split per process, resumable)."""
    import datasets

    if isinstance(dataset, datasets.IterableDataset):
        return StreamingCaptionDataset.from_hf_dataset(dataset, columns)
    return as_caption_dataset(dataset, columns)


def streaming_dataloader(dataset: StreamingCaptionDataset, args, collate_fn, batch_size: int) -> DataLoader:
    """The training ``DataLoader`` of a stream, with the ``TrainingArguments``' loader settings; not passed through
    ``accelerator.prepare``, which would dispatch or re-shard a stream that already reads only this process's part
    (the Trainer moves batches to the device itself). Exact resume needs ``dataloader_in_order`` (the default)."""
    dataset.set_split(args.process_index, args.world_size, batch_size)
    return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=args.dataloader_num_workers,
                      pin_memory=args.dataloader_pin_memory, persistent_workers=args.dataloader_persistent_workers,
                      multiprocessing_context=args.dataloader_multiprocessing_context,
                      prefetch_factor=args.dataloader_prefetch_factor, in_order=args.dataloader_in_order)
