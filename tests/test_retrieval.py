"""RetrievalIndex: exact top-k vs brute force, scores as the original computes them, persistence, import, errors."""

import functools
import json
import math
import multiprocessing
import os
import pickle
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gill_hf import retrieval
from gill_hf.retrieval import EMBEDDINGS_FILE, PATHS_FILE, RetrievalIndex


def _brute_force(candidates, queries, logit_scale, k):
    scores = F.normalize(queries.float(), dim=-1) @ F.normalize(candidates.float(), dim=-1).t() * math.exp(logit_scale)
    return scores.topk(k, dim=1)


@pytest.mark.parametrize("chunk_size", [1, 97, 10_000])
def test_topk_equals_brute_force(chunk_size):
    g = torch.Generator().manual_seed(0)
    candidates, queries = torch.randn(1000, 16, generator=g), torch.randn(6, 16, generator=g)
    index = RetrievalIndex(candidates, [f"img{i}.png" for i in range(1000)], logit_scale=2.5, dtype=torch.float32)
    scores, indices = index.search(queries, k=5, chunk_size=chunk_size)
    ref = _brute_force(candidates, queries, 2.5, 5)
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(scores, ref.values)
    _, one_index = index.search(queries[2], k=5, chunk_size=chunk_size)  # a single (p,) query
    assert torch.equal(one_index, ref.indices[2])


def test_fp16_index_is_exact_over_its_stored_rows():
    g = torch.Generator().manual_seed(1)
    candidates, queries = torch.randn(500, 32, generator=g), torch.randn(12, 32, generator=g)  # > 8 queries: GEMM
    index = RetrievalIndex(candidates, [str(i) for i in range(500)], dtype=torch.float16)
    assert index.embeddings.dtype == torch.float16
    torch.testing.assert_close(index.embeddings.float().norm(dim=1), torch.ones(500), atol=1e-3, rtol=0)
    scores, indices = index.search(queries, k=3, chunk_size=64)
    ref = (F.normalize(queries, dim=-1).half().float() @ index.embeddings.float().t()).topk(3, dim=1)
    torch.testing.assert_close(scores, ref.values, atol=2e-3, rtol=1e-3)
    assert (indices == ref.indices).float().mean() > 0.95  # fp16 accumulation may swap near-ties only
    exact = (F.normalize(queries, dim=-1) @ index.embeddings.float().t()).topk(3, dim=1)  # fp32 re-scoring
    assert torch.equal(indices, exact.indices)
    torch.testing.assert_close(scores, exact.values, atol=1e-6, rtol=1e-6)


def test_exclude_skips_candidates():
    g = torch.Generator().manual_seed(2)
    candidates, query = torch.randn(50, 8, generator=g), torch.randn(1, 8, generator=g)
    index = RetrievalIndex(candidates, [str(i) for i in range(50)], dtype=torch.float32)
    _, best = index.search(query, k=3)
    exclude = torch.zeros(1, 50, dtype=torch.bool)
    exclude[0, best[0, 0]] = True
    _, again = index.search(query, k=3, chunk_size=7, exclude=exclude)
    assert torch.equal(again[0, :2], best[0, 1:])
    assert best[0, 0] not in again[0]


def test_from_images_reproduces_the_original_scores(make_model):
    """score = exp(logit_scale) * cos(W_t2i h, W_i2t CLIP(x)), as the original pre-scales its candidate matrix."""
    model = make_model("opt").eval()
    images = [Image.new("RGB", (40, 36), c) for c in ("red", "blue", "green", "white")]
    index = RetrievalIndex.from_images(model, images, paths=["r", "b", "g", "w"], batch_size=3, dtype=torch.float32)
    assert len(index) == 4 and index.dim == model.config.ret_emb_dim
    with torch.no_grad():
        image_embeds = model.image_retrieval_embeddings(model.encode_images(model.processor.preprocess_images(images)))
        query = model.text_retrieval_embeddings(torch.randn(2, model.config.llm_feature_dim))
    scores, indices = index.search(query, k=4)
    scale = model.adapter.logit_scale.exp().item()
    matrix = scale * F.normalize(image_embeds, dim=-1)  # the original's pre-scaled candidate matrix
    expected = (F.normalize(query, dim=-1) @ matrix.t()).topk(4, dim=1)
    assert torch.equal(indices, expected.indices)
    torch.testing.assert_close(scores, expected.values, atol=1e-5, rtol=1e-5)


def test_save_load_round_trip_is_memory_mapped(tmp_path):
    g = torch.Generator().manual_seed(3)
    index = RetrievalIndex(torch.randn(40, 8, generator=g), [f"https://x/{i}.jpg" for i in range(40)],
                           logit_scale=1.25, dtype=torch.float16)
    index.save(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted([EMBEDDINGS_FILE, PATHS_FILE])  # no staging left behind
    assert json.loads((tmp_path / PATHS_FILE).read_text())[3] == "https://x/3.jpg"
    loaded = RetrievalIndex.load(tmp_path)
    assert loaded.paths == index.paths and loaded.logit_scale == 1.25
    assert torch.equal(loaded.embeddings, index.embeddings)
    query = torch.randn(2, 8, generator=g)
    for a, b in zip(loaded.search(query, k=4), index.search(query, k=4)):
        assert torch.equal(a, b)
    # memory-mapped, not copied: rewriting the file's first row shows through the loaded tensor
    file = tmp_path / EMBEDDINGS_FILE
    header_len = int.from_bytes(file.read_bytes()[:8], "little")
    with open(file, "r+b") as handle:
        handle.seek(8 + header_len)
        handle.write(np.full(8, 0.5, dtype=np.float16).tobytes())
    assert torch.equal(loaded.embeddings[0], torch.full((8,), 0.5, dtype=torch.float16))
    copied = RetrievalIndex.load(tmp_path, mmap=False)
    assert torch.equal(copied.embeddings, loaded.embeddings)


def test_import_original_release_pickle(tmp_path):
    rng = np.random.default_rng(0)
    rows = [rng.standard_normal((1, 16)).astype(np.float32) for _ in range(10)]  # per-row arrays, as released
    path = tmp_path / "cc3m_embeddings_urls.npy"
    path.write_bytes(pickle.dumps({"paths": [f"http://img/{i}" for i in range(10)], "embeddings": rows}))
    index = RetrievalIndex.from_original_release(path, logit_scale=math.log(1 / 0.07), dtype=torch.float32)
    assert index.paths[7] == "http://img/7"
    expected = F.normalize(torch.from_numpy(np.concatenate(rows)), dim=-1)
    torch.testing.assert_close(index.embeddings, expected)
    query = torch.from_numpy(rows[4][0])
    scores, indices = index.search(query, k=1)
    assert indices.item() == 4 and scores.item() == pytest.approx(1 / 0.07, rel=1e-5)


def test_import_refuses_code_in_pickles(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.npy"
    path.write_bytes(pickle.dumps({"paths": ["a"], "embeddings": [Evil()]}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        RetrievalIndex.from_original_release(path, logit_scale=0.0)
    path.write_bytes(pickle.dumps({"urls": ["a"]}))
    with pytest.raises(ValueError, match="expected keys 'paths', 'embeddings'"):
        RetrievalIndex.from_original_release(path, logit_scale=0.0)


def test_faiss_option():
    index = RetrievalIndex(torch.randn(30, 8), [str(i) for i in range(30)], dtype=torch.float32)
    try:
        import faiss
    except ImportError:
        with pytest.raises(ImportError, match="faiss-cpu"):
            index.use_faiss()
        return
    query = torch.randn(3, 8)
    exact = index.search(query, k=4)
    index.use_faiss()
    scores, indices = index.search(query, k=4)
    assert torch.equal(indices, exact[1])
    torch.testing.assert_close(scores, exact[0], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="16 wide but the embeddings are 8"):
        index.use_faiss(faiss.IndexFlatIP(16))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("queries", [1, 2, 5])
def test_faiss_scan_equals_fp32_brute_force_over_the_fp16_rows(threads, queries):
    """k=40 over 101 rows in 3 blocks of 34: blocks shorter than k leave empty heap slots that the merge must drop."""
    g = torch.Generator().manual_seed(4)
    index = RetrievalIndex(torch.randn(101, 24, generator=g), [str(i) for i in range(101)], logit_scale=1.5,
                           dtype=torch.float16)
    query = torch.randn(queries, 24, generator=g)
    ref = (F.normalize(query, dim=-1) @ index.embeddings.float().t() * math.exp(1.5)).topk(40, dim=1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        scores, indices = index.search(query, k=40, scan="faiss")
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(indices, ref.indices)
    torch.testing.assert_close(scores, ref.values, atol=1e-6, rtol=1e-6)
    torch_scores, torch_indices = index.search(query, k=40, scan="torch")
    assert torch.equal(torch_indices, indices)
    torch.testing.assert_close(torch_scores, scores, atol=1e-6, rtol=1e-6)
    assert torch.equal(index.search(query, k=500, scan="faiss")[1], index.search(query, k=500, scan="torch")[1])


def test_auto_scan_takes_faiss_for_one_or_two_fp16_queries_on_cpu(monkeypatch):
    calls = []
    real = retrieval._faiss_fp16_topk
    monkeypatch.setattr(retrieval, "_faiss_fp16_topk", lambda *args: calls.append(args[1].shape[0]) or real(*args))
    g = torch.Generator().manual_seed(5)
    half = RetrievalIndex(torch.randn(64, 8, generator=g), [str(i) for i in range(64)], dtype=torch.float16)
    for queries in (1, 2, 3):
        half.search(torch.randn(queries, 8, generator=g), k=3)
    half.search(torch.randn(8, generator=g), k=3, scan="torch")
    half.search(torch.randn(1, 8, generator=g), k=3, exclude=torch.zeros(1, 64, dtype=torch.bool))
    full = RetrievalIndex(half.embeddings.float(), half.paths, normalized=True)
    full.search(torch.randn(1, 8, generator=g), k=3)
    assert calls == [1, 2]


def test_faiss_scan_refuses_what_it_cannot_do(monkeypatch):
    index = RetrievalIndex(torch.randn(20, 8), [str(i) for i in range(20)], dtype=torch.float32)
    with pytest.raises(ValueError, match="not fp16"):
        index.search(torch.randn(8), scan="faiss")
    half = RetrievalIndex(index.embeddings, index.paths, dtype=torch.float16, normalized=True)
    with pytest.raises(ValueError, match="exclude mask"):
        half.search(torch.randn(1, 8), scan="faiss", exclude=torch.zeros(1, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="scan must be one of"):
        half.search(torch.randn(8), scan="blas")
    monkeypatch.setitem(sys.modules, "faiss", None)  # faiss not installed
    monkeypatch.setattr(retrieval, "_faiss_installed", functools.cache(retrieval._faiss_installed.__wrapped__))
    with pytest.raises(ImportError, match="faiss-cpu"):
        half.search(torch.randn(8), scan="faiss")
    assert torch.equal(half.search(torch.randn(8), k=20)[1].sort().values, torch.arange(20))  # auto: torch


def test_faiss_scan_runs_in_a_forked_child_after_the_parent_scanned():
    """The parent's scan threads do not survive a fork; the child must get a pool of its own, not hang."""
    index = RetrievalIndex(torch.randn(5000, 8), [str(i) for i in range(5000)], dtype=torch.float16)
    query = torch.randn(8)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)  # the pool is used from 2 threads on, whatever the machine's core count
    try:
        expected = index.search(query, k=3, scan="faiss")[1]
        with multiprocessing.get_context("fork").Pool(1) as pool:
            found = pool.apply_async(_search_in_child, (index, query)).get(timeout=60)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(found, expected)


def _search_in_child(index, query):
    torch.set_num_threads(2)
    return index.search(query, k=3, scan="faiss")[1]


def test_an_explicit_scan_bypasses_the_faiss_index_in_use(monkeypatch):
    calls = []
    real = retrieval._faiss_fp16_topk
    monkeypatch.setattr(retrieval, "_faiss_fp16_topk", lambda *args: calls.append(1) or real(*args))
    g = torch.Generator().manual_seed(7)
    index = RetrievalIndex(torch.randn(300, 16, generator=g), [str(i) for i in range(300)], dtype=torch.float16)
    query = torch.randn(16, generator=g)
    exact = index.search(query, k=4, scan="torch")
    index.use_faiss("fp16")
    calls.clear()
    assert torch.equal(index.search(query, k=4, scan="torch")[1], exact[1]) and calls == []  # torch, not FAISS
    assert torch.equal(index.search(query, k=4)[1], exact[1]) and calls == [1]  # auto: the fp16 index's codes
    flat = RetrievalIndex(index.embeddings.float(), index.paths, normalized=True).use_faiss("flat")
    with pytest.raises(ValueError, match="not fp16"):  # the stored rows, whatever index is in use
        flat.search(query, scan="faiss")


def test_huge_pages_fall_back_to_plain_memory_where_the_kernel_refuses_them(monkeypatch):
    class NoHugePages:
        def madvise(self, advice):
            raise OSError(22, "Invalid argument")

        def close(self):
            self.closed = True

    refused = NoHugePages()
    monkeypatch.setattr(retrieval, "_HUGE_PAGE_BYTES", 1)
    monkeypatch.setattr(retrieval.mmap_module, "mmap", lambda *args, **kwargs: refused)
    rows = torch.randn(64, 8)
    index = RetrievalIndex(rows, [str(i) for i in range(64)], dtype=torch.float16)
    assert refused.closed and torch.equal(index.embeddings, F.normalize(rows, dim=-1).half())


def test_large_in_memory_rows_live_in_huge_pages(tmp_path, monkeypatch):
    monkeypatch.setattr(retrieval, "_HUGE_PAGE_BYTES", 1 << 22)
    g = torch.Generator().manual_seed(6)
    rows, queries = torch.randn(8192, 256, generator=g), torch.randn(3, 256, generator=g)  # 4 MiB of fp16
    index = RetrievalIndex(rows, [str(i) for i in range(8192)], dtype=torch.float16)
    assert _huge_page_advised(index.embeddings)
    torch.testing.assert_close(index.embeddings, F.normalize(rows, dim=-1).half(), atol=0, rtol=0)
    ref = (F.normalize(queries, dim=-1) @ index.embeddings.float().t()).topk(4, dim=1)
    assert torch.equal(index.search(queries, k=4)[1], ref.indices)
    index.save(tmp_path)
    loaded = RetrievalIndex.load(tmp_path, mmap=False)  # read straight into huge pages
    assert _huge_page_advised(loaded.embeddings) and torch.equal(loaded.embeddings, index.embeddings)
    assert not _huge_page_advised(RetrievalIndex.load(tmp_path).embeddings)  # memory-mapped: the file's own pages
    assert not _huge_page_advised(RetrievalIndex(rows[:100], [str(i) for i in range(100)]).embeddings)  # small
    file = tmp_path / EMBEDDINGS_FILE
    file.write_bytes(file.read_bytes()[:-10])
    with pytest.raises(ValueError, match=f"{EMBEDDINGS_FILE}: .*cut short"):
        RetrievalIndex.load(tmp_path, mmap=False)


def _huge_page_advised(tensor: torch.Tensor) -> bool:
    """Whether the mapping holding ``tensor`` carries madvise(MADV_HUGEPAGE) (``hg`` in /proc/self/smaps)."""
    address, inside = tensor.data_ptr(), False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, stop = (int(bound, 16) for bound in head.split("-"))
                inside = start <= address < stop
            elif inside and head == "VmFlags:":
                return "hg" in line.split()[1:]
    raise AssertionError("no mapping holds the tensor")


@pytest.mark.parametrize("mmap", [True, False])
def test_saved_fp16_faiss_index_is_memory_mapped_and_exact(tmp_path, mmap):
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(3)
    candidates, queries = torch.randn(400, 16, generator=g), torch.randn(4, 16, generator=g)
    index = RetrievalIndex(candidates, [str(i) for i in range(400)], dtype=torch.float16)
    exact = index.search(queries, k=5)
    index.use_faiss("fp16").save(tmp_path)
    loaded = RetrievalIndex.load(tmp_path, mmap=mmap)
    assert loaded._faiss.codes.is_owned is not mmap  # with mmap the codes stay in faiss.index on disk
    scores, indices = loaded.search(queries, k=5)  # 4 queries: FAISS's own search
    assert torch.equal(indices, exact[1])
    torch.testing.assert_close(scores, exact[0], atol=1e-5, rtol=1e-5)
    for one in queries:  # one query: the index's codes scanned in parallel row blocks
        own = loaded._faiss.search(F.normalize(one, dim=0)[None].numpy(), 5)
        scores, indices = loaded.search(one, k=5)
        assert torch.equal(indices, torch.from_numpy(own[1][0]))
        torch.testing.assert_close(scores, torch.from_numpy(own[0][0]), atol=1e-6, rtol=1e-6)


def test_bad_inputs_raise(tmp_path):
    index = RetrievalIndex(torch.randn(5, 8), list("abcde"))
    with pytest.raises(ValueError, match=r"queries must be \(Q, 8\)"):
        index.search(torch.randn(2, 16))
    with pytest.raises(ValueError, match="k must be >= 1"):
        index.search(torch.randn(8), k=0)
    assert index.search(torch.randn(8), k=10)[1].shape == (5,)  # k is capped at the index size
    with pytest.raises(ValueError, match="at least one candidate"):
        RetrievalIndex(torch.zeros(0, 8), [])
    with pytest.raises(ValueError, match="5 embeddings but 4 paths"):
        RetrievalIndex(torch.randn(5, 8), list("abcd"))
    with pytest.raises(ValueError, match="float16 or float32"):
        RetrievalIndex(torch.randn(5, 8), list("abcde"), dtype=torch.bfloat16)
    with pytest.raises(FileNotFoundError, match="not a saved RetrievalIndex"):
        RetrievalIndex.load(tmp_path)


def _with_bad_rows(n: int = 12, p: int = 8) -> torch.Tensor:
    rows = torch.randn(n, p, generator=torch.Generator().manual_seed(5))
    rows[3, 1], rows[7, 0], rows[7, 5] = float("nan"), float("inf"), -float("inf")
    return rows


@pytest.mark.parametrize("scan_rows", [5, 1 << 16])  # rows 3 and 7 in two scan chunks, or in one
def test_nonfinite_rows_are_refused_when_built(tmp_path, monkeypatch, scan_rows):
    monkeypatch.setattr("gill_hf.retrieval._SCAN_ROWS", scan_rows)
    rows = _with_bad_rows()
    with pytest.raises(ValueError, match=r"embedding rows \[3, 7\] of 12 hold NaN or inf"):
        RetrievalIndex(rows, [str(i) for i in range(12)])
    many = torch.full((30, 4), float("nan"))
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\. \(30 rows\)\]"):
        RetrievalIndex(many, [str(i) for i in range(30)])
    release = tmp_path / "cc3m_embeddings.npy"
    release.write_bytes(pickle.dumps({"paths": [str(i) for i in range(12)], "embeddings": rows.numpy()}))
    with pytest.raises(ValueError, match=r"cc3m_embeddings.npy: embedding rows \[3, 7\] of 12"):
        RetrievalIndex.from_original_release(release, logit_scale=0.0)
    with pytest.raises(ValueError, match="logit_scale must be finite"):
        RetrievalIndex(torch.randn(2, 4), ["a", "b"], logit_scale=float("inf"))


@pytest.mark.parametrize("mmap", [True, False])
def test_nonfinite_rows_are_refused_when_loaded(tmp_path, mmap):
    import safetensors.torch

    RetrievalIndex(torch.randn(12, 8), [str(i) for i in range(12)]).save(tmp_path)
    file = tmp_path / EMBEDDINGS_FILE  # a file written elsewhere, "normalized" but with broken rows
    safetensors.torch.save_file({"embeddings": _with_bad_rows().half()}, file, metadata={"normalized": "true"})
    with pytest.raises(ValueError, match=rf"{EMBEDDINGS_FILE}: embedding rows \[3, 7\] of 12 hold NaN or inf"):
        RetrievalIndex.load(tmp_path, mmap=mmap)


def test_nonfinite_queries_are_refused():
    index = RetrievalIndex(torch.randn(6, 8), list("abcdef"))
    queries = torch.randn(4, 8)
    queries[2, 3] = float("nan")
    with pytest.raises(ValueError, match=r"query rows \[2\] hold NaN or inf"):
        index.search(queries)
    with pytest.raises(ValueError, match=r"query rows \[0\]"):
        index.search(torch.full((8,), float("inf")))


def test_broken_index_folders_are_named(tmp_path):
    RetrievalIndex(torch.randn(4, 8), list("abcd")).save(tmp_path)
    (tmp_path / PATHS_FILE).write_text('{"a": 1}')
    with pytest.raises(ValueError, match=rf"{PATHS_FILE} must hold a JSON list of image paths"):
        RetrievalIndex.load(tmp_path)
    (tmp_path / PATHS_FILE).write_text('["a", "b", "c"]')
    with pytest.raises(ValueError, match=rf"{EMBEDDINGS_FILE}: 4 embeddings but 3 paths"):
        RetrievalIndex.load(tmp_path)
    (tmp_path / PATHS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {PATHS_FILE} in"):
        RetrievalIndex.load(tmp_path)
    (tmp_path / PATHS_FILE).write_text('["a", "b", "c", "d"]')
    file = tmp_path / EMBEDDINGS_FILE
    file.write_bytes(file.read_bytes()[:-10])  # truncated data
    with pytest.raises(ValueError, match=rf"{EMBEDDINGS_FILE}: "):
        RetrievalIndex.load(tmp_path)


def test_pipeline_refuses_an_index_of_another_width(make_model, tmp_path, monkeypatch):
    from gill_hf import GILLForConditionalGeneration
    from gill_hf.pipeline_gill import RETRIEVAL_FOLDER, GILLPipeline

    pipe = GILLPipeline.from_gill(make_model("opt").eval())
    p = pipe.gill_model.config.ret_emb_dim
    wrong = RetrievalIndex(torch.randn(3, p // 2), ["a", "b", "c"])
    message = rf"retrieval index is {p // 2} wide but the GILL model's retrieval width .* is {p}"
    with pytest.raises(ValueError, match=message):
        pipe.retrieval_index = wrong
    with pytest.raises(TypeError, match="must be a RetrievalIndex or None, got Tensor"):
        pipe.retrieval_index = torch.randn(3, p)
    parts = {name: getattr(pipe, name) for name in ("gill_model", "processor", "unet", "vae", "scheduler")}
    with pytest.raises(ValueError, match=message):
        GILLPipeline(**parts, retrieval_index=wrong)
    right = RetrievalIndex(torch.randn(3, p), ["a", "b", "c"])
    pipe.retrieval_index = right
    assert pipe.retrieval_index is right
    pipe.save_pretrained(tmp_path)
    assert GILLPipeline.from_pretrained(tmp_path).retrieval_index.paths == ["a", "b", "c"]
    wrong.save(tmp_path / RETRIEVAL_FOLDER)  # a saved pipeline whose index came from another model

    def no_weights(*args, **kwargs):
        raise AssertionError("the GILL model was loaded before the index was checked")

    monkeypatch.setattr(GILLForConditionalGeneration, "from_pretrained", no_weights)
    with pytest.raises(ValueError, match=rf"{RETRIEVAL_FOLDER}: the " + message):
        GILLPipeline.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):  # a passed gill_model is checked the same way
        GILLPipeline.from_pretrained(tmp_path, gill_model=pipe.gill_model)
