"""Precomputed generation targets: every caption encoded once by the diffusion text encoder (paper Sec. 3.4).

On disk a store is a folder::

    index.json          {"num_items", "shard_size", "shape": [L, D], "dtype", "captions_sha256", "shards": [...]}
    null.npy            (L, D) encoding of "" (the CFG target)
    shard-00000.npy     (shard_size, L, D) rows 0..shard_size-1, one file per shard

Shards are written to a temporary name and renamed, so an interrupted run resumes at the first missing shard, and
``process_index`` / ``num_processes`` split the shards between processes. Reading memory-maps the shards
(``np.load(mmap_mode="r")``, never unpickling).
"""

import hashlib
import json
import os

import numpy as np
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path, write_text_atomic

INDEX_NAME = "index.json"
NULL_NAME = "null.npy"


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def captions_digest(captions) -> str:
    """SHA-256 over the captions in order: ties a store to the exact dataset it was computed for."""
    h = hashlib.sha256()
    for caption in captions:
        h.update(caption.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def _atomic_save(path: str, array: np.ndarray):
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


class DiffusionTextEncoder:
    """The diffusion model's tokenizer + text encoder: captions -> ``(N, L, D)`` ``last_hidden_state``."""

    def __init__(self, diffusion_model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        from transformers import AutoTokenizer, CLIPTextModel

        self.tokenizer = AutoTokenizer.from_pretrained(diffusion_model, subfolder="tokenizer")
        self.model = CLIPTextModel.from_pretrained(diffusion_model, subfolder="text_encoder", dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.device = torch.device(device)

    @property
    def max_length(self) -> int:  # L
        return self.tokenizer.model_max_length

    @torch.no_grad()
    def __call__(self, captions: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                                return_tensors="pt")
        return self.model(input_ids=tokens.input_ids.to(self.device)).last_hidden_state.float().cpu()


def precompute_targets(captions: list[str], out_dir: str | os.PathLike, encoder, *, batch_size: int = 64,
                       shard_size: int = 4096, dtype: str = "float16", process_index: int = 0, num_processes: int = 1,
                       progress: bool = True) -> str:
    """Encode ``captions`` into a target store at ``out_dir``; returns the folder. Finished shards are skipped.

    ``encoder``: any callable ``list[str] -> (n, L, D)`` tensor (e.g. :class:`DiffusionTextEncoder`). Shard ``s``
    is done by process ``s % num_processes``; every process can run the same command with its own index.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must lie in [0, {num_processes}), got {process_index}")
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    if not captions:
        raise ValueError("no captions to encode")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    null = encoder([""])[0].numpy()  # (L, D)
    index = {"num_items": len(captions), "shard_size": shard_size, "shape": list(null.shape), "dtype": dtype,
             "captions_sha256": captions_digest(captions),
             "shards": [shard_name(i) for i in range(-(-len(captions) // shard_size))]}
    index_path = os.path.join(out_dir, INDEX_NAME)
    if os.path.exists(index_path):
        with open(index_path) as f:
            old = json.load(f)
        if {k: old.get(k) for k in index} != index:
            raise ValueError(f"{out_dir} holds a target store for other captions or settings; use a new folder")
    elif process_index == 0:
        write_text_atomic(index_path, json.dumps(index, indent=1))
    if process_index == 0 and not os.path.exists(os.path.join(out_dir, NULL_NAME)):
        _atomic_save(os.path.join(out_dir, NULL_NAME), null.astype(dtype))
    mine = [s for s in range(len(index["shards"])) if s % num_processes == process_index]
    todo = [s for s in mine if not os.path.exists(os.path.join(out_dir, shard_name(s)))]
    bar = tqdm(total=sum(min(shard_size, len(captions) - s * shard_size) for s in todo), unit="caption",
               desc=f"targets [{process_index}/{num_processes}]", disable=not progress)
    for s in todo:
        chunk = captions[s * shard_size:(s + 1) * shard_size]
        rows = []
        for start in range(0, len(chunk), batch_size):
            rows.append(encoder(chunk[start:start + batch_size]).numpy().astype(dtype))  # (b, L, D)
            bar.update(len(rows[-1]))
        _atomic_save(os.path.join(out_dir, shard_name(s)), np.concatenate(rows))
    bar.close()
    return out_dir


class TargetStore:
    """Read-only view of a finished store: ``store[i]`` -> ``(L, D)`` float32 tensor; ``store.null`` likewise."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, INDEX_NAME)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"no target store at {self.path} (missing {INDEX_NAME}); run "
                                    f"`gill-hf precompute-targets` first")
        with open(index_path) as f:
            self.index = json.load(f)
        missing = [s for s in self.index["shards"] + [NULL_NAME] if not os.path.exists(os.path.join(self.path, s))]
        if missing:
            raise ValueError(f"target store {self.path} is incomplete: {len(missing)} file(s) missing, e.g. "
                             f"{missing[:3]}; re-run precompute-targets to finish it")
        self._shards = [None] * len(self.index["shards"])
        self.null = torch.from_numpy(np.load(os.path.join(self.path, NULL_NAME), allow_pickle=False).astype(np.float32))

    def __len__(self) -> int:
        return self.index["num_items"]

    @property
    def shape(self) -> tuple[int, int]:  # (L, D)
        return tuple(self.index["shape"])

    def check_captions(self, captions) -> None:
        """Raise if the store was computed for other captions than ``captions`` (order matters)."""
        if len(captions) != len(self) or captions_digest(captions) != self.index["captions_sha256"]:
            raise ValueError(f"target store {self.path} does not match this dataset's {len(captions)} captions "
                             f"(store holds {len(self)}); recompute it for this dataset")

    def _shard(self, s: int) -> np.ndarray:
        if self._shards[s] is None:
            self._shards[s] = np.load(os.path.join(self.path, self.index["shards"][s]), mmap_mode="r",
                                      allow_pickle=False)
        return self._shards[s]

    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"target index {i} out of range for a store of {len(self)}")
        s, row = divmod(int(i), self.index["shard_size"])
        return torch.from_numpy(np.array(self._shard(s)[row], dtype=np.float32))
