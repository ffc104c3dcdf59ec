"""RetrievalIndex: L2-normalised candidate image embeddings (W_i2t CLIP(x)) with exact chunked top-k search.

On disk a folder holds ``embeddings.safetensors`` (one ``(N, p)`` fp16/fp32 tensor, already normalised; the
logit scale in its metadata) and ``paths.json`` (N image paths or URLs). Loading memory-maps the tensor, so a
corpus larger than RAM is searched page by page. Scores reproduce the original's ``exp(logit_scale) * cosine``.
Rows holding NaN / inf are refused when an index is built or loaded (one pass over the rows, chunk by chunk), and
so are such queries: a NaN row would otherwise come back as the top-1 candidate.

An optional FAISS index over the same rows (exact ``IndexFlatIP`` or a trained IVF-PQ, see :meth:`use_faiss`) is
saved beside them as ``faiss.index`` and loaded with them. Where faiss is installed, one or two queries over fp16 rows
on the CPU are scanned exactly with FAISS's SIMD fp16 kernel in parallel row blocks (``search(scan=...)``): at this
width torch's fp16 matrix-vector product is compute-bound at about a third of the memory bandwidth. Rows the index
holds in memory (not memory-mapped) from 32 MiB on live in transparent huge pages, which scan faster.
"""

import functools
import json
import math
import mmap as mmap_module
import os
import shutil
import struct
import tempfile
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import safetensors.torch
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

EMBEDDINGS_FILE = "embeddings.safetensors"
PATHS_FILE = "paths.json"
FAISS_FILE = "faiss.index"
FAISS_KINDS = ("flat", "fp16", "ivfpq")
SCANS = ("auto", "torch", "faiss")
_NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32}
_TORCH_DTYPES = {"F16": torch.float16, "F32": torch.float32}
_SCAN_ROWS = 1 << 16  # rows checked for NaN / inf at a time
_LISTED = 10  # row numbers named in an error
_ADD_ROWS = 1 << 16  # rows handed to FAISS at a time (bounded memory over a memory-mapped index)
_FAISS_SCAN_QUERIES = 2  # FAISS's per-query scan beats torch's one GEMM over all queries up to here (bench/)
_HUGE_PAGE_BYTES = 1 << 25  # in-memory rows from this size live in transparent huge pages (Linux)


class RetrievalIndex:
    """``(N, p)`` unit-norm candidates + their paths; ``search`` returns scaled cosines and indices.

    Args:
        embeddings: ``(N, p)`` candidate embeddings; normalised here unless ``normalized=True``.
        paths: N image paths or URLs, in row order.
        logit_scale: log of the score scale (the model's ``adapter.logit_scale``); scores = exp(it) * cosine.
        dtype: storage dtype, ``torch.float16`` (half the bytes to scan) or ``torch.float32``.
    """

    def __init__(self, embeddings: torch.Tensor, paths: Sequence[str], logit_scale: float = 0.0,
                 dtype: torch.dtype | None = None, normalized: bool = False):
        if embeddings.dim() != 2:
            raise ValueError(f"embeddings must be (N, p), got shape {tuple(embeddings.shape)}")
        if embeddings.shape[0] == 0:
            raise ValueError("a RetrievalIndex needs at least one candidate embedding")
        if len(paths) != embeddings.shape[0]:
            raise ValueError(f"{embeddings.shape[0]} embeddings but {len(paths)} paths")
        dtype = dtype or (embeddings.dtype if embeddings.dtype in (torch.float16, torch.float32) else torch.float32)
        if dtype not in (torch.float16, torch.float32):
            raise ValueError(f"index dtype must be float16 or float32, got {dtype}")
        if not math.isfinite(logit_scale):
            raise ValueError(f"logit_scale must be finite, got {logit_scale}")
        bad = _nonfinite_rows(embeddings)
        if bad:
            raise ValueError(f"embedding rows {_rows(bad)} of {embeddings.shape[0]} hold NaN or inf values")
        copied = not normalized or embeddings.dtype != dtype  # else the rows stay the caller's (or a file's) memory
        if not normalized:
            embeddings = F.normalize(embeddings.float(), dim=-1)
        rows = _huge_page_empty(embeddings.shape, dtype) if copied and embeddings.device.type == "cpu" else None
        self.embeddings = embeddings.to(dtype) if rows is None else rows.copy_(embeddings)  # (N, p), unit rows
        self.paths = list(paths)
        self.logit_scale = float(logit_scale)
        self._faiss, self._rerank = None, 1

    # ---- construction ----
    @classmethod
    @torch.no_grad()
    def from_images(cls, model, images: Sequence, paths: Sequence[str] | None = None, batch_size: int = 64,
                    dtype: torch.dtype = torch.float16) -> "RetrievalIndex":
        """Embed images (PIL or paths) with CLIP -> W_i2t; ``paths`` default to the images' own paths."""
        if paths is None:
            if not all(isinstance(im, (str, os.PathLike)) for im in images):
                raise ValueError("pass `paths` when the images are not file paths")
            paths = [os.fspath(im) for im in images]
        if len(images) == 0:
            raise ValueError("a RetrievalIndex needs at least one image")
        chunks = [embed_images(model, images[start:start + batch_size])
                  for start in tqdm(range(0, len(images), batch_size), desc="embedding images", unit="batch")]
        return cls(torch.cat(chunks), paths, model.adapter.logit_scale.item(), dtype=dtype, normalized=True)

    @classmethod
    def from_original_release(cls, path: str | os.PathLike, logit_scale: float,
                              dtype: torch.dtype = torch.float16) -> "RetrievalIndex":
        """Import the original release's ``cc3m_embeddings*.npy`` (a pickle of ``{"paths", "embeddings"}``)
        through the restricted unpickler; ``logit_scale`` is the released model's."""
        from .safe_pickle import safe_load

        data = safe_load(path)
        if not isinstance(data, dict) or not {"paths", "embeddings"} <= set(data):
            raise ValueError(f"{os.fspath(path)} is not a GILL embeddings file (expected keys 'paths', 'embeddings')")
        rows = data["embeddings"]
        try:
            matrix = np.asarray(rows, dtype=np.float32) if isinstance(rows, np.ndarray) else \
                np.stack([np.asarray(row, dtype=np.float32).reshape(-1) for row in rows])
            return cls(torch.from_numpy(matrix), [str(p) for p in data["paths"]], logit_scale, dtype=dtype)
        except ValueError as err:
            raise ValueError(f"{os.fspath(path)}: {err}") from err

    # ---- persistence ----
    def save(self, directory: str | os.PathLike):
        """Write ``embeddings.safetensors`` + ``paths.json`` (+ ``faiss.index`` when FAISS is in use) into
        ``directory`` via a temporary folder; a stale ``faiss.index`` of an earlier save is removed first."""
        target = os.fspath(directory)
        os.makedirs(target, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".index-", dir=target)
        try:
            safetensors.torch.save_file({"embeddings": self.embeddings.contiguous()},
                                        os.path.join(staging, EMBEDDINGS_FILE),
                                        metadata={"logit_scale": repr(self.logit_scale), "normalized": "true"})
            with open(os.path.join(staging, PATHS_FILE), "w") as handle:
                json.dump(self.paths, handle)
            names = [EMBEDDINGS_FILE, PATHS_FILE]
            if self._faiss is not None:
                import faiss

                faiss.write_index(self._faiss, os.path.join(staging, FAISS_FILE))
                names.append(FAISS_FILE)
            if os.path.exists(os.path.join(target, FAISS_FILE)):
                os.remove(os.path.join(target, FAISS_FILE))
            for name in names:
                os.replace(os.path.join(staging, name), os.path.join(target, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    @classmethod
    def load(cls, directory: str | os.PathLike, mmap: bool = True, faiss_index: bool | None = None
             ) -> "RetrievalIndex":
        """Open a saved index; with ``mmap`` the embeddings (and the codes of an exact ``faiss.index``) stay on disk
        and are paged in while searching. ``faiss_index``: search through the saved ``faiss.index`` (default: when
        the folder holds one; ``True`` requires it, ``False`` searches exactly without importing faiss)."""
        directory = os.fspath(directory)
        file, paths_file = os.path.join(directory, EMBEDDINGS_FILE), os.path.join(directory, PATHS_FILE)
        for name in (file, paths_file):
            if not os.path.exists(name):
                raise FileNotFoundError(f"no {os.path.basename(name)} in {directory}: not a saved RetrievalIndex")
        faiss_file = os.path.join(directory, FAISS_FILE)
        if faiss_index and not os.path.exists(faiss_file):
            raise FileNotFoundError(f"no {FAISS_FILE} in {directory}: save the index after use_faiss()")
        paths = _read_paths(paths_file)
        try:
            embeddings, metadata = _open_safetensors(file, "embeddings", mmap)
            index = cls(embeddings, paths, float(metadata.get("logit_scale", 0.0)),
                        normalized=metadata.get("normalized") == "true")
        except (ValueError, struct.error, safetensors.SafetensorError) as err:
            raise ValueError(f"{file}: {err}") from err
        if faiss_index is not False and os.path.exists(faiss_file):
            try:
                index.use_faiss(_read_faiss(faiss_file, mmap))
            except ValueError as err:
                raise ValueError(f"{faiss_file}: {err}") from err
        return index

    # ---- search ----
    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        return self.embeddings.shape[1]

    def check_width(self, width: int, what: str):
        """A ``ValueError`` naming both widths unless the index is ``width`` wide (``what`` says whose width)."""
        if self.dim != width:
            raise ValueError(f"the retrieval index is {self.dim} wide but {what} is {width}: build the index with "
                             f"this model (RetrievalIndex.from_images)")

    def use_faiss(self, index="flat", rerank: int = 10, **options):
        """Search through FAISS instead: ``"flat"`` builds the exact ``faiss.IndexFlatIP`` (fp32 rows), ``"fp16"``
        an fp16 ``IndexScalarQuantizer`` (exact over fp16 rows, half the bytes, SIMD scans), ``"ivfpq"`` a trained
        IVF-PQ (``options`` of :func:`build_ivfpq`: ``nlist``, ``pq_m``, ``nprobe``, ``train_rows``, ``seed``), for
        corpora of tens of millions; or pass any inner-product FAISS index holding these rows in order. Needs
        ``pip install gill-hf[faiss]``.

        An approximate index (anything but these two exact kinds) returns ``rerank * k`` candidates, re-scored exactly
        over the stored rows (``rerank=1``: its own top-k and scores); queries it leaves short of k candidates fall
        back to the exact scan."""
        faiss = import_faiss()
        if rerank < 1:
            raise ValueError(f"rerank must be >= 1, got {rerank}")
        if isinstance(index, str):
            if index not in FAISS_KINDS:
                raise ValueError(f"unknown FAISS index kind {index!r}; expected one of {FAISS_KINDS}")
            if index != "ivfpq" and options:
                raise TypeError(f"the exact FAISS indexes take no options, got {sorted(options)}")
            index = build_ivfpq(self.embeddings, **options) if index == "ivfpq" else _add_rows(
                _exact_faiss(faiss, index, self.dim), self.embeddings)
        elif options:
            raise TypeError(f"options {sorted(options)} apply to a FAISS index built here, not to one passed in")
        if index.d != self.dim:
            raise ValueError(f"the FAISS index is {index.d} wide but the embeddings are {self.dim} wide")
        if index.ntotal != len(self):
            raise ValueError(f"the FAISS index holds {index.ntotal} rows but the embeddings {len(self)}")
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ValueError("the FAISS index must use the inner-product metric (scores are cosines of unit rows)")
        self._faiss = index
        self._rerank = 1 if isinstance(index, faiss.IndexFlat) or _is_fp16_flat(index) else rerank
        return self

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int = 5, chunk_size: int = 1 << 20,
               exclude: torch.Tensor | None = None, scan: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
        """Exact top-k: ``(Q, p)`` or ``(p,)`` queries -> scores ``(Q, k)`` (exp(logit_scale) * cosine, fp32)
        and row indices ``(Q, k)``. ``exclude``: a bool ``(Q, N)`` mask of candidates to skip (e.g. images
        already shown; it bypasses FAISS). Rows are scanned ``chunk_size`` at a time, so memory stays bounded.

        ``scan``: ``"auto"`` searches the FAISS index in use (see :meth:`use_faiss`), else scans the stored rows
        exactly with FAISS's fp16 scanner for up to two queries when it applies and faiss is installed, else with
        torch. ``"torch"`` / ``"faiss"`` scan the stored rows exactly with that kernel, bypassing a FAISS index in
        use: torch matmuls, or FAISS's fp16 scanner over row blocks in ``torch.get_num_threads()`` threads (fp16
        rows on the CPU, no ``exclude``; scores are fp32 dot products of the fp16 rows, as the torch path's
        re-scoring gives)."""
        if scan not in SCANS:
            raise ValueError(f"scan must be one of {SCANS}, got {scan!r}")
        single = queries.dim() == 1
        queries = queries.unsqueeze(0) if single else queries
        if queries.dim() != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be (Q, {self.dim}) to match the index, got shape {tuple(queries.shape)}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        bad = _nonfinite_rows(queries)
        if bad:
            raise ValueError(f"query rows {_rows(bad)} hold NaN or inf values")
        k = min(k, len(self))
        unit = F.normalize(queries.float(), dim=-1)
        if self._faiss is not None and exclude is None and scan == "auto":
            scores, indices = self._faiss_topk(unit.cpu(), k)
            short = (indices < 0).any(dim=1)  # an approximate index found fewer than k candidates
            if short.any():
                scores[short], indices[short] = self._exact_topk(unit[short], k, chunk_size, None, scan)
        else:
            scores, indices = self._exact_topk(unit, k, chunk_size, exclude, scan)
        scores = scores * math.exp(self.logit_scale)
        return (scores[0], indices[0]) if single else (scores, indices)

    def _faiss_topk(self, unit: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """FAISS's top-k cosines and rows (-1 where it found too few), re-ranked exactly when ``_rerank > 1``."""
        index = self._faiss
        if _is_fp16_flat(index) and unit.shape[0] <= _FAISS_SCAN_QUERIES:  # its codes in parallel row blocks
            return _faiss_fp16_topk(fp16_codes(index), unit.numpy(), k)
        cos, idx = index.search(unit.numpy(), min(k * self._rerank, len(self)))
        scores, indices = torch.from_numpy(cos).float(), torch.from_numpy(idx).long()
        if self._rerank == 1:
            return scores, indices
        device = self.embeddings.device
        rows = self.embeddings[indices.clamp(min=0).flatten().to(device)].float().view(*indices.shape, self.dim)
        exact = torch.einsum("qcp,qp->qc", rows, unit.to(device)).cpu().masked_fill(indices < 0, float("-inf"))
        top = exact.topk(k, dim=1)
        return top.values, indices.gather(1, top.indices).masked_fill(top.values == float("-inf"), -1)

    def _exact_topk(self, unit: torch.Tensor, k: int, chunk_size: int, exclude, scan: str):
        """Top-k of ``(Q, p)`` unit queries over the rows: FAISS's scanner where ``scan`` asks for it (see
        :meth:`search`), else ``chunk_size`` rows per matmul in the storage dtype.

        A matmul per chunk (fp16 inputs, fp32 accumulation) shortlists ``2k`` rows per query; fp16 shortlists are
        re-scored in fp32, so returned scores do not carry fp16 output rounding and near-ties are ordered right.
        """
        if self._faiss_scans(unit.shape[0], exclude, scan):
            return _faiss_fp16_topk(self.embeddings.numpy(), unit.cpu().numpy(), k)
        device = self.embeddings.device
        q32 = unit.to(device)  # (Q, p) fp32
        q = q32.to(self.embeddings.dtype)
        shortlist = k if self.embeddings.dtype == torch.float32 else 2 * k
        best_scores = torch.full((q.shape[0], 0), float("-inf"), device=device)
        best_idx = torch.zeros((q.shape[0], 0), dtype=torch.long, device=device)
        for start in range(0, len(self), chunk_size):
            chunk = self.embeddings[start:start + chunk_size]  # (C, p)
            cos = q @ chunk.t()  # (Q, C) storage dtype
            if exclude is not None:
                cos = cos.masked_fill(exclude[:, start:start + chunk.shape[0]].to(device), float("-inf"))
            top = cos.topk(min(shortlist, cos.shape[1]), dim=1)
            scores = top.values.float()
            if shortlist > k:  # fp32 scores of the shortlisted rows (excluded ones stay -inf)
                exact = torch.einsum("qcp,qp->qc", chunk[top.indices].float(), q32)
                scores = exact.masked_fill(scores == float("-inf"), float("-inf"))
            best_scores = torch.cat([best_scores, scores], dim=1)
            best_idx = torch.cat([best_idx, top.indices + start], dim=1)
            keep = best_scores.topk(min(k, best_scores.shape[1]), dim=1)
            best_scores, best_idx = keep.values, best_idx.gather(1, keep.indices)
        return best_scores.cpu(), best_idx.cpu()

    def _faiss_scans(self, queries: int, exclude, scan: str) -> bool:
        """Whether the exact scan of ``queries`` queries runs on FAISS's fp16 scanner (``scan="faiss"`` refuses
        what it cannot do)."""
        if scan == "torch":
            return False
        unfit = ("the index rows are not fp16" if self.embeddings.dtype != torch.float16
                 else "the index rows are not on the CPU" if self.embeddings.device.type != "cpu"
                 else "an exclude mask is given" if exclude is not None
                 else "the index rows are not contiguous" if not self.embeddings.is_contiguous() else None)
        if scan == "faiss":
            if unfit:
                raise ValueError(f"scan='faiss' scans contiguous fp16 rows on the CPU without an exclude mask: {unfit}")
            import_faiss()
            return True
        return unfit is None and queries <= _FAISS_SCAN_QUERIES and _faiss_installed()

@torch.no_grad()
def embed_images(model, images: Sequence) -> torch.Tensor:
    """Images (PIL or paths) -> ``(n, p)`` unit-norm fp32 CPU rows W_i2t CLIP(x) of a GILL model, one batch."""
    pixels = model.processor.preprocess_images(list(images))
    features = model.encode_images(pixels.to(model.adapter.logit_scale.device))
    return F.normalize(model.image_retrieval_embeddings(features).float(), dim=-1).cpu()


def build_ivfpq(embeddings: torch.Tensor, nlist: int | None = None, pq_m: int | None = None, nprobe: int = 16,
                train_rows: int | None = None, seed: int = 0):
    """A trained ``faiss`` IVF-PQ inner-product index over the ``(N, p)`` unit rows (added in row order).

    ``nlist`` coarse cells (default ~4 sqrt(N)), ``pq_m`` sub-quantisers of 8 bits (default the largest divisor
    of p up to p / 4: a quarter of the fp16 bytes per row), ``nprobe`` cells visited per query, k-means trained on
    ``train_rows`` rows drawn with ``seed`` (default all rows up to 64 per cell and at least 256 x 39).
    """
    faiss = import_faiss()
    n, dim = embeddings.shape
    nlist = nlist or max(1, min(int(4 * math.sqrt(n)), n // 39))
    pq_m = pq_m or max(m for m in range(1, max(1, dim // 4) + 1) if dim % m == 0)
    if dim % pq_m:
        raise ValueError(f"pq_m must divide the embedding width {dim}, got {pq_m}")
    if not 1 <= nlist <= n or nprobe < 1:
        raise ValueError(f"nlist must lie in [1, {n}] and nprobe be >= 1, got {nlist} and {nprobe}")
    index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}", faiss.METRIC_INNER_PRODUCT)
    index.do_polysemous_training = False  # Hamming-code reordering: unused here, and most of the training time
    train_rows = min(n, train_rows or max(64 * nlist, 256 * 39))
    sample = np.sort(np.random.default_rng(seed).choice(n, size=train_rows, replace=False))
    index.train(embeddings[torch.from_numpy(sample)].float().numpy())
    index.nprobe = min(nprobe, nlist)
    return _add_rows(index, embeddings)


def _faiss_fp16_topk(rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of ``(Q, p)`` fp32 unit ``queries`` over ``(N, p)`` fp16 ``rows`` with FAISS's SIMD fp16
    scanner: one block of rows per thread, ``torch.get_num_threads()`` threads (FAISS frees the GIL; one call per
    thread, as smaller blocks lose time handing work over), a k-heap per query and block, merged by one topk.
    -> fp32 scores ``(Q, k)``, row indices ``(Q, k)``."""
    faiss = import_faiss()
    n, dim = rows.shape
    threads = torch.get_num_threads()
    block = -(-n // threads)
    codes = rows.view(np.uint8)  # (N, 2p): the fp16 scalar quantizer's codes are the rows' own bytes
    quantizer = faiss.ScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16)
    queries = np.ascontiguousarray(queries, dtype=np.float32)

    def scan(start: int) -> tuple[np.ndarray, np.ndarray]:
        stop = min(n, start + block)
        scanner = quantizer.select_InvertedListScanner(faiss.METRIC_INNER_PRODUCT, None, True, None, False)
        scanner.set_list(0, 0.0)  # store_pairs: labels are row offsets in the block
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        labels = np.full((len(queries), k), -1, dtype=np.int64)
        for q in range(len(queries)):
            scanner.set_query(faiss.swig_ptr(queries[q]))
            scanner.scan_codes(stop - start, faiss.swig_ptr(codes[start:stop]), None, faiss.swig_ptr(scores[q]),
                               faiss.swig_ptr(labels[q]), k)
        return scores, labels + start  # a block shorter than k leaves -inf entries that the merge drops

    starts = range(0, n, block)
    parts = list(_scan_pool(threads, os.getpid()).map(scan, starts)) if threads > 1 and len(starts) > 1 \
        else map(scan, starts)
    scores, labels = (torch.from_numpy(np.concatenate(part, axis=1)) for part in zip(*parts))
    top = scores.topk(min(k, n), dim=1)
    return top.values, labels.gather(1, top.indices)


@functools.cache
def _scan_pool(threads: int, pid: int) -> ThreadPoolExecutor:
    """One pool per thread count and process (a forked child gets a pool of its own, not its parent's dead one)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="gill-faiss-scan")


@functools.cache
def _faiss_installed() -> bool:
    try:
        import_faiss()
    except ImportError:
        return False
    return True


def fp16_codes(index) -> np.ndarray:
    """The ``(N, p)`` fp16 rows an exact fp16 FAISS index holds, as a view of its codes (in memory or mapped)."""
    codes = import_faiss().rev_swig_ptr(index.codes.data(), index.ntotal * index.code_size)
    return codes.view(np.float16).reshape(index.ntotal, index.d)


def _is_fp16_flat(index) -> bool:
    """Whether a FAISS index is the exact fp16 ``IndexScalarQuantizer`` (its codes are fp16 rows)."""
    faiss = import_faiss()
    return isinstance(index, faiss.IndexScalarQuantizer) and index.sq.qtype == faiss.ScalarQuantizer.QT_fp16


def _exact_faiss(faiss, kind: str, dim: int):
    """An empty exact inner-product FAISS index: fp32 ``IndexFlatIP`` (``"flat"``) or fp16 scalar codes."""
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    return faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)


def _add_rows(index, embeddings: torch.Tensor):
    """``index`` with every row of ``embeddings`` added in order, ``_ADD_ROWS`` at a time (fp32 copies)."""
    for start in range(0, embeddings.shape[0], _ADD_ROWS):
        index.add(np.ascontiguousarray(embeddings[start:start + _ADD_ROWS].float().numpy()))
    return index


def import_faiss():
    """The ``faiss`` module, or an ``ImportError`` saying how to install it (or search without it)."""
    try:
        import faiss
    except ImportError as err:
        raise ImportError("FAISS search needs the faiss package (pip install gill-hf[faiss], or faiss-cpu); "
                          "RetrievalIndex.load(..., faiss_index=False) searches exactly without it") from err
    return faiss


def _read_faiss(file: str, mmap: bool = False):
    """A FAISS index read from ``file`` (FAISS's own format, no pickle), its codes memory-mapped when ``mmap`` (flat
    and scalar-quantizer kinds: ``IO_FLAG_MMAP_IFC``); a ``ValueError`` naming the file if unreadable."""
    faiss = import_faiss()
    try:
        return faiss.read_index(file, faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except RuntimeError as err:
        raise ValueError(f"{file} is not a readable FAISS index: {' '.join(str(err).split())[:300]}") from err


def _huge_page_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """An empty CPU tensor in private anonymous memory advised for transparent huge pages, or None below
    ``_HUGE_PAGE_BYTES`` or where ``madvise(MADV_HUGEPAGE)`` is unavailable. A scan of 4 KiB pages takes a TLB miss
    every 4 KiB; on huge pages the 1M x 256 fp16 scan runs about 1.4x faster (2-core VM, bench/)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < _HUGE_PAGE_BYTES or not hasattr(mmap_module, "MADV_HUGEPAGE"):
        return None
    memory = mmap_module.mmap(-1, nbytes, flags=mmap_module.MAP_PRIVATE | mmap_module.MAP_ANONYMOUS)
    try:
        memory.madvise(mmap_module.MADV_HUGEPAGE)
    except OSError:  # a kernel without transparent huge pages (EINVAL): plain memory instead
        memory.close()
        return None
    return torch.frombuffer(memory, dtype=dtype).view(shape)  # the tensor keeps the map alive


def _nonfinite_rows(matrix: torch.Tensor) -> list[int]:
    """Row numbers of a ``(N, p)`` tensor holding NaN or inf, scanned ``_SCAN_ROWS`` rows at a time."""
    bad = []
    for start in range(0, matrix.shape[0], _SCAN_ROWS):
        finite = torch.isfinite(matrix[start:start + _SCAN_ROWS]).all(dim=1)
        bad += (torch.nonzero(~finite).flatten() + start).tolist()
    return bad


def _rows(rows: list[int]) -> str:
    return str(rows[:_LISTED])[:-1] + (f", ... ({len(rows)} rows)]" if len(rows) > _LISTED else "]")


def _read_paths(file: str) -> list[str]:
    try:
        with open(file, encoding="utf-8") as handle:
            paths = json.load(handle)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{file} is not a JSON file: {err}") from err
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise ValueError(f"{file} must hold a JSON list of image paths (strings)")
    return paths


def _open_safetensors(file: str, name: str, mmap: bool) -> tuple[torch.Tensor, dict]:
    """One tensor of a safetensors file, memory-mapped read-only through numpy when ``mmap`` (fp16/fp32 only)."""
    with open(file, "rb") as handle:
        (header_len,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_len))
    metadata = header.pop("__metadata__", {}) or {}
    if name not in header:
        raise ValueError(f"no tensor named {name!r}")
    entry = header[name]
    begin, end = entry["data_offsets"]
    rows = None if mmap or entry["dtype"] not in _TORCH_DTYPES else _huge_page_empty(
        tuple(entry["shape"]), _TORCH_DTYPES[entry["dtype"]])
    if rows is not None:  # read straight into huge pages
        data = memoryview(rows.numpy()).cast("B")
        if data.nbytes != end - begin:
            raise ValueError(f"tensor {name!r} has {end - begin} bytes, its shape and dtype say {data.nbytes}")
        with open(file, "rb") as handle:
            handle.seek(8 + header_len + begin)
            if handle.readinto(data) != data.nbytes:
                raise ValueError(f"tensor {name!r} is cut short: the file ends inside its {data.nbytes} bytes")
        return rows, metadata
    if not mmap or entry["dtype"] not in _NUMPY_DTYPES:
        return safetensors.torch.load_file(file)[name], metadata
    array = np.memmap(file, dtype=_NUMPY_DTYPES[entry["dtype"]], mode="r", offset=8 + header_len + begin,
                      shape=tuple(entry["shape"]))
    if array.nbytes != end - begin:
        raise ValueError(f"tensor {name!r} has {end - begin} bytes, its shape and dtype say {array.nbytes}")
    with warnings.catch_warnings():  # torch warns that the read-only map is not writable; the index never writes
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array), metadata
