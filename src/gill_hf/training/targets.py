"""Precomputed generation targets: every caption encoded once by the diffusion text encoder (paper Sec. 3.4).

On disk a store is a folder::

    index.json          {"num_items", "shard_size", "shape": [L, D], "dtype", "captions_sha256", "shards": [...],
                         "batch_size", "null_sha256"}
                        (+ "pooled_dim": P for layouts with a pooled vector: SDXL, SD3, Flux)
    null.npy            (L, D) encoding of "" (the CFG target)
    shard-00000.npy     (shard_size, L, D) rows 0..shard_size-1, one file per shard
    null-pooled.npy, pooled-00000.npy   (P,) and (shard_size, P): the pooled vectors, for such layouts
    caption-keys.npy    (num_items,) little-endian uint64: row i's caption key (:func:`caption_keys`)

``index.json`` is written first and records the settings (:func:`gill_hf.resumable.start_or_resume`: a run with
other captions, settings or encoder is refused). Shards are written whole (a temporary name renamed), so a killed
run resumes at the missing shards; processes launched together (torchrun / accelerate launch) or started with
``process_index`` / ``num_processes`` split them, and the store equals a one-process run's. Reading memory-maps the
shards (``np.load(mmap_mode="r")``, never unpickling).

Rows are found by position (``store[i]``: a TSV's example i, checked with :meth:`TargetStore.check_captions`) or by
caption (:meth:`TargetStore.rows_for`: streams, whose examples have no fixed position): a caption's target depends
on its text only. The keys are sorted once when first used and searched with ``np.searchsorted`` (no dict over
millions of captions); a repeated caption may resolve to any of its rows (they hold the same target).
"""

import hashlib
import json
import os

import numpy as np
import torch

from ..atomic import atomic_path
from ..resumable import PartsProgress, process_share, start_or_resume

INDEX_NAME = "index.json"
NULL_NAME = "null.npy"
NULL_POOLED_NAME = "null-pooled.npy"
KEYS_NAME = "caption-keys.npy"
STORE_DTYPES = ("float16", "float32")


def shard_name(i: int) -> str:
    return f"shard-{i:05d}.npy"


def pooled_shard_name(i: int) -> str:
    return f"pooled-{i:05d}.npy"


def captions_digest(captions) -> str:
    """SHA-256 over the captions in order: ties a store to the exact dataset it was computed for."""
    h = hashlib.sha256()
    for caption in captions:
        h.update(caption.encode("utf-8"))
        h.update(b"\0")
    return h.hexdigest()


def caption_keys(captions) -> np.ndarray:
    """``(n,)`` little-endian uint64 keys: BLAKE2b with an 8-byte digest over each caption's UTF-8 bytes (the exact
    string, no stripping)."""
    digests = b"".join(hashlib.blake2b(c.encode("utf-8"), digest_size=8).digest() for c in captions)
    return np.frombuffer(digests, dtype="<u8")


def _checked_keys(captions: list[str]) -> np.ndarray:
    """:func:`caption_keys` of ``captions``; a ``ValueError`` if two different captions share a key (odds ~n^2 /
    2^65: about 1e-7 for 3M captions), which would give one of them the other's target."""
    keys = caption_keys(captions)
    order = np.argsort(keys, kind="stable")
    for j in np.flatnonzero(keys[order][1:] == keys[order][:-1]):
        first, second = captions[order[j]], captions[order[j + 1]]
        if first != second:
            raise ValueError(f"captions {first!r} and {second!r} share the 64-bit caption key "
                             f"{int(keys[order[j]]):#018x}; change one of them (e.g. a trailing space)")
    return keys


def _atomic_save(path: str, array: np.ndarray):
    with atomic_path(path, ".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


class DiffusionTextEncoder:
    """The diffusion model's tokenizers + text encoders, as its layout's family uses them
    (:mod:`gill_hf.diffusion_layouts`): captions -> ``(N, L, D)`` sequence targets, or ``((N, L, D), (N, P))``
    with the pooled vectors for layouts that take one (SDXL, SD3, Flux), equal to the family's diffusers
    ``encode_prompt``."""

    def __init__(self, diffusion_model: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        import transformers
        from diffusers import DiffusionPipeline

        from ..diffusion_layouts import FAMILIES, layout_of_folder

        self.layout = layout_of_folder(diffusion_model)
        self.family = FAMILIES[self.layout.family]
        components = DiffusionPipeline.load_config(diffusion_model)
        self.encoders = {}  # component name -> (tokenizer, model)
        for name in self.family.components:
            tokenizer_name = name.replace("text_encoder", "tokenizer")
            model_class = getattr(transformers, components[name][1])
            model = model_class.from_pretrained(diffusion_model, subfolder=name, dtype=dtype)
            self.encoders[name] = (transformers.AutoTokenizer.from_pretrained(diffusion_model,
                                                                              subfolder=tokenizer_name),
                                   model.to(device).eval().requires_grad_(False))
        self.device = torch.device(device)

    @property
    def max_length(self) -> int:  # L
        return self.family.sequence_length

    def _encode(self, name: str, captions: list[str]):
        """One text encoder's output over ``captions`` (CLIP: its tokenizer's length; T5: the family's)."""
        tokenizer, model = self.encoders[name]
        length = self.family.t5_length if name == self.family.t5_encoder else tokenizer.model_max_length
        tokens = tokenizer(list(captions), padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt")
        hidden = name in self.family.text_encoders and self.family.hidden_state is not None
        return model(input_ids=tokens.input_ids.to(self.device), output_hidden_states=hidden)

    @torch.no_grad()
    def __call__(self, captions: list[str]):
        out = {name: self._encode(name, captions) for name in self.family.components}
        states = [out[name].last_hidden_state if self.family.hidden_state is None
                  else out[name].hidden_states[self.family.hidden_state] for name in self.family.text_encoders]
        sequence = torch.cat(states, dim=-1).float().cpu() if states else None  # (N, 77, D1 + ...)
        if self.family.t5_encoder is not None:  # CLIP states zero-padded to T5's width, then T5's along L
            t5 = out[self.family.t5_encoder].last_hidden_state.float().cpu()  # (N, t5_length, D)
            sequence = t5 if sequence is None else torch.cat(
                [torch.nn.functional.pad(sequence, (0, t5.shape[-1] - sequence.shape[-1])), t5], dim=-2)
        if not self.family.pooled_encoders:
            return sequence
        pooled = [out[name].text_embeds if "text_embeds" in out[name] else out[name].pooler_output
                  for name in self.family.pooled_encoders]  # projected CLIP embeds where there is a projection
        return sequence, torch.cat(pooled, dim=-1).float().cpu()  # (N, P)


def _split(encoded):
    """An encoder's output -> ``(sequence (n, L, D), pooled (n, P) or None)`` numpy arrays."""
    sequence, pooled = encoded if isinstance(encoded, tuple) else (encoded, None)
    return sequence.numpy(), None if pooled is None else pooled.numpy()


def precompute_targets(captions: list[str], out_dir: str | os.PathLike, encoder, *, batch_size: int = 64,
                       shard_size: int = 4096, dtype: str = "float16", process_index: int | None = None,
                       num_processes: int | None = None, progress: bool = True) -> str:
    """Encode ``captions`` into a target store at ``out_dir``; returns the folder. Finished shards are skipped.

    ``encoder``: any callable ``list[str] -> (n, L, D)`` tensor, or ``((n, L, D), (n, P))`` with pooled vectors
    (e.g. :class:`DiffusionTextEncoder`). Shard ``s`` is done by process ``s % num_processes``. By default the
    processes are the launcher's (torchrun / accelerate launch, or an initialised ``torch.distributed`` group): each
    encodes its shards, then waits until the store is complete, rank 0's bar counting every shard. Or give this
    process's share for runs started separately (each returns after its own shards). The store equals a
    one-process run's; a run into a folder holding other captions, settings or encoder (its encoding of ``""``)
    is refused. Each row's caption key is recorded (``caption-keys.npy``) for :meth:`TargetStore.rows_for`; a
    re-run into a store written before keys existed adds them (the captions are checked against the store's).
    """
    process_index, num_processes, launched = process_share(process_index, num_processes)
    if batch_size < 1 or shard_size < 1:
        raise ValueError(f"batch_size and shard_size must be >= 1, got {batch_size} and {shard_size}")
    if dtype not in STORE_DTYPES:
        raise ValueError(f"dtype must be one of {STORE_DTYPES}, got {dtype!r}")
    if not captions:
        raise ValueError("no captions to encode")
    out_dir = os.fspath(out_dir)
    null, null_pooled = _split(encoder([""]))  # (1, L, D), (1, P) or None
    null = null[0].astype(dtype)
    null_pooled = None if null_pooled is None else null_pooled[0].astype(dtype)
    index = {"num_items": len(captions), "shard_size": shard_size, "shape": list(null.shape), "dtype": dtype,
             "captions_sha256": captions_digest(captions),
             "shards": [shard_name(i) for i in range(-(-len(captions) // shard_size))],
             "batch_size": batch_size, "null_sha256": _null_digest(null, null_pooled)}
    if null_pooled is not None:
        index["pooled_dim"] = null_pooled.shape[-1]
    keys = _checked_keys(captions)  # before anything is written: a collision leaves no store behind
    start_or_resume(os.path.join(out_dir, INDEX_NAME), index, "a target store",
                    "resume with the same captions, settings and encoder, or use a new folder")
    if not os.path.exists(os.path.join(out_dir, KEYS_NAME)):  # any process: the same bytes (of the checked captions)
        _atomic_save(os.path.join(out_dir, KEYS_NAME), keys)
    if not os.path.exists(os.path.join(out_dir, NULL_NAME)):  # any process: the same bytes (their digest is checked)
        if null_pooled is not None:  # written first: null.npy marks the null targets as complete
            _atomic_save(os.path.join(out_dir, NULL_POOLED_NAME), null_pooled)
        _atomic_save(os.path.join(out_dir, NULL_NAME), null)
    sizes = [min(shard_size, len(captions) - s * shard_size) for s in range(len(index["shards"]))]
    bar = PartsProgress(out_dir, index["shards"], sizes, unit="caption", desc="targets",
                        disable=not progress or (launched and process_index != 0))
    for s in bar.missing():
        if s % num_processes == process_index:
            _encode_shard(encoder, captions[s * shard_size:(s + 1) * shard_size], s, out_dir, batch_size, dtype, bar)
    if launched and num_processes > 1:
        bar.wait()
    bar.close()
    return out_dir


def _null_digest(null: np.ndarray, null_pooled: np.ndarray | None) -> str:
    """SHA-256 of the stored encoding(s) of "": ties a store to its encoder (weights, dtype, device)."""
    h = hashlib.sha256(null.tobytes())
    if null_pooled is not None:
        h.update(null_pooled.tobytes())
    return h.hexdigest()


def _encode_shard(encoder, chunk: list[str], s: int, out_dir: str, batch_size: int, dtype: str, bar):
    """Shard ``s`` (its captions ``chunk``) encoded ``batch_size`` at a time and written whole."""
    rows, pooled_rows = [], []
    for start in range(0, len(chunk), batch_size):
        sequence, pooled = _split(encoder(chunk[start:start + batch_size]))
        rows.append(sequence.astype(dtype))  # (b, L, D)
        if pooled is not None:
            pooled_rows.append(pooled.astype(dtype))  # (b, P)
        bar.update(len(rows[-1]))
    if pooled_rows:  # written first: the sequence shard marks the shard as done
        _atomic_save(os.path.join(out_dir, pooled_shard_name(s)), np.concatenate(pooled_rows))
    _atomic_save(os.path.join(out_dir, shard_name(s)), np.concatenate(rows))
    bar.part_written()


class TargetStore:
    """Read-only view of a finished store: ``store[i]`` -> ``(L, D)`` float32 tensor; ``store.null`` likewise;
    for layouts with a pooled vector ``store.pooled(i)`` -> ``(P,)`` and ``store.null_pooled`` (else None);
    ``store.rows_for(captions)`` -> the rows of those captions."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        index_path = os.path.join(self.path, INDEX_NAME)
        if not os.path.exists(index_path):
            raise FileNotFoundError(f"no target store at {self.path} (missing {INDEX_NAME}); run "
                                    f"`gill-hf precompute-targets` first")
        with open(index_path) as f:
            self.index = json.load(f)
        files = self.index["shards"] + [NULL_NAME]
        if self.pooled_dim is not None:
            files += [pooled_shard_name(s) for s in range(len(self.index["shards"]))] + [NULL_POOLED_NAME]
        missing = [s for s in files if not os.path.exists(os.path.join(self.path, s))]
        if missing:
            raise ValueError(f"target store {self.path} is incomplete: {len(missing)} file(s) missing, e.g. "
                             f"{missing[:3]}; re-run precompute-targets to finish it")
        self._shards = {}
        self._key_index = None  # (sorted keys (n,), their rows (n,)), on first use
        self.null = self._load(NULL_NAME)
        self.null_pooled = self._load(NULL_POOLED_NAME) if self.pooled_dim is not None else None

    def _load(self, name: str) -> torch.Tensor:
        return torch.from_numpy(np.load(os.path.join(self.path, name), allow_pickle=False).astype(np.float32))

    @property
    def pooled_dim(self) -> int | None:  # P, for layouts with a pooled vector
        return self.index.get("pooled_dim")

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

    def check_caption_keys(self) -> None:
        """Load the caption keys (:meth:`rows_for`); a ``ValueError`` if the store has none (written before they
        existed) or they do not fit its rows."""
        if self._key_index is not None:
            return
        path = os.path.join(self.path, KEYS_NAME)
        if not os.path.exists(path):
            raise ValueError(f"target store {self.path} has no caption keys ({KEYS_NAME}; written by an older "
                             "gill_hf): re-run `gill-hf precompute-targets` with the same captions and folder to add "
                             "them (finished shards are kept)")
        keys = np.load(path, allow_pickle=False)
        if keys.dtype != np.dtype("<u8") or keys.shape != (len(self),):
            raise ValueError(f"target store {self.path}: {KEYS_NAME} holds {keys.dtype} {keys.shape}, expected "
                             f"uint64 ({len(self)},), one key per row; re-run precompute-targets into a new folder")
        order = np.argsort(keys, kind="stable")
        self._key_index = (keys[order], order)

    def rows_for(self, captions: list[str]) -> np.ndarray:
        """``(n,)`` int64 rows holding ``captions``' targets (the exact strings); a ``ValueError`` names the
        captions the store does not hold."""
        self.check_caption_keys()
        sorted_keys, order = self._key_index
        keys = caption_keys(captions)
        at = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
        found = sorted_keys[at] == keys
        if not found.all():
            missing = [c for c, hit in zip(captions, found) if not hit]
            raise ValueError(f"target store {self.path} holds no target for the caption {missing[0]!r} "
                             f"({len(missing)} of this batch's {len(captions)} missing): it was computed for other "
                             "data; run `gill-hf precompute-targets` on this data")
        return order[at]

    def _shard(self, name: str) -> np.ndarray:
        if name not in self._shards:
            self._shards[name] = np.load(os.path.join(self.path, name), mmap_mode="r", allow_pickle=False)
        return self._shards[name]

    def _row(self, i: int, shard_names) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(f"target index {i} out of range for a store of {len(self)}")
        s, row = divmod(int(i), self.index["shard_size"])
        return torch.from_numpy(np.array(self._shard(shard_names(s))[row], dtype=np.float32))

    def __getitem__(self, i: int) -> torch.Tensor:  # (L, D)
        return self._row(i, lambda s: self.index["shards"][s])

    def pooled(self, i: int) -> torch.Tensor:  # (P,)
        if self.pooled_dim is None:
            raise ValueError(f"target store {self.path} holds no pooled vectors (its layout takes none)")
        return self._row(i, pooled_shard_name)
