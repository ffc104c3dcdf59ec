"""Resumable jobs written in numbered parts (``gill-hf build-index``, ``gill-hf precompute-targets``).

A job records its settings in a state file when it starts (:func:`start_or_resume`); a later run with other
settings is refused, naming the settings that differ. Its output is cut into parts, each written whole (a temporary
file renamed into place, :func:`~gill_hf.atomic.atomic_path`), so a killed run leaves only finished parts and the
next run skips them. Parts can be shared between processes: part ``s`` is done by process ``s % num_processes``
(:func:`process_share` reads the ranks of torchrun / accelerate launch), and :class:`PartsProgress` counts the whole
job from the parts on disk, so every process can wait for the others (:meth:`PartsProgress.wait`).
"""

import json
import os
import time
import uuid
from collections.abc import Callable, Sequence

import torch.distributed as dist
from tqdm.auto import tqdm

from .atomic import write_text_atomic


def start_or_resume(state_file: str, state: dict, what: str, remedy: str):
    """Record ``state`` (JSON) in ``state_file``, or check that the job recorded there has the same settings.

    Creation is exclusive (a hard link to a finished staging file), so processes starting together agree on one
    state. Otherwise a ``ValueError``: ``<folder> holds <what> of another source or settings ([keys] differ);
    <remedy>``.
    """
    staging = f"{state_file}.{uuid.uuid4().hex}.tmp"
    write_text_atomic(staging, json.dumps(state, indent=1))
    try:
        os.link(staging, state_file)
        return
    except FileExistsError:
        pass
    finally:
        os.unlink(staging)
    with open(state_file, encoding="utf-8") as handle:
        old = json.load(handle)
    state = json.loads(json.dumps(state))  # tuples -> lists, as read back
    if old != state:
        changed = sorted(key for key in set(state) | set(old) if old.get(key) != state.get(key))
        raise ValueError(f"{os.path.dirname(os.path.abspath(state_file))} holds {what} of another source or "
                         f"settings ({changed} differ); {remedy}")


def finished_prefix(folder: str, part_name: Callable[[int], str]) -> int:
    """How many parts ``part_name(0), part_name(1), ...`` exist in ``folder`` without a gap (a sequential job)."""
    count = 0
    while os.path.exists(os.path.join(folder, part_name(count))):
        count += 1
    return count


def process_share(process_index: int | None = None, num_processes: int | None = None) -> tuple[int, int, bool]:
    """``(process_index, num_processes, launched)``: the share given, else the launcher's (an initialised
    ``torch.distributed`` group, else ``RANK`` / ``WORLD_SIZE`` as torchrun and accelerate launch set them), else
    ``(0, 1)``. ``launched``: the processes were started together (so they may wait for each other)."""
    if (process_index is None) != (num_processes is None):
        raise ValueError(f"give both process_index and num_processes or neither (then the launcher's ranks are "
                         f"used), got {process_index} and {num_processes}")
    if process_index is not None:
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index must lie in [0, {num_processes}), got {process_index}")
        return process_index, num_processes, False
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), True
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if not 0 <= rank < world:
        raise ValueError(f"the launcher's RANK={rank} does not lie in [0, WORLD_SIZE={world})")
    return rank, world, world > 1


class PartsProgress:
    """A tqdm bar over a whole job: the items of the parts found in ``folder`` (by any process) plus those this
    process reports with :meth:`update` for the part it is working on.

    Args:
        folder: where the parts are written.
        names: every part's file name, in order.
        sizes: items per part (same order).
        poll_s: seconds between looks at ``folder`` while waiting.
        **bar: tqdm options (``desc``, ``unit``, ``disable`` ...).
    """

    def __init__(self, folder: str, names: Sequence[str], sizes: Sequence[int], poll_s: float = 0.5, **bar):
        self.folder, self.names, self.sizes, self.poll_s = folder, list(names), list(sizes), poll_s
        self.bar = tqdm(total=sum(self.sizes), initial=self.done(), **bar)

    def missing(self) -> list[int]:
        """Numbers of the parts not written yet."""
        return [s for s, name in enumerate(self.names) if not os.path.exists(os.path.join(self.folder, name))]

    def done(self) -> int:
        """Items in the parts written so far."""
        missing = set(self.missing())
        return sum(size for s, size in enumerate(self.sizes) if s not in missing)

    def update(self, items: int):
        self.bar.update(items)

    def part_written(self):
        """Re-count from disk after this process wrote a part (other processes' parts included)."""
        self.bar.update(self.done() - self.bar.n)

    def wait(self):
        """Block until every part exists (the other processes finished theirs), the bar following them."""
        while self.missing():
            time.sleep(self.poll_s)
            self.part_written()
        self.part_written()

    def close(self):
        self.bar.close()
