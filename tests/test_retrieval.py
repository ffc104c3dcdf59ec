"""RetrievalIndex: exact top-k vs brute force, scores as the original computes them, persistence, import, errors."""

import json
import math
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

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
