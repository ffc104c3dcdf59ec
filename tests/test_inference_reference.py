"""Inference pieces against independent computations: the restricted unpickler, GILL's [IMG] decoding rules,
``hidden_layer`` at generation time, retrieval (exclusion, FAISS, de-duplication within an answer) and the
decision (config threshold, retrieval-score feature)."""

import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gill_hf import GILLPipeline, ImagePart, RetrievalIndex
from gill_hf.decision import decide
from gill_hf.generation_gill import GILLImageLogitsProcessor
from gill_hf.safe_pickle import safe_load

PROMPT = ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the same dog at the beach."]
FAST = dict(max_new_tokens=14, force_image_after=2, max_images=1, eos_token_id=[], num_inference_steps=2)
TWO_IMAGES = {**FAST, "max_new_tokens": 24, "max_images": 2}

pytestmark = pytest.mark.usefixtures("single_thread")


# ---------------------------------------------------------------- restricted unpickler
class _Call:
    """Pickles as ``func(*args)``: what a malicious embeddings file would hold."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("func", [exec, eval, getattr, setattr, __import__, compile], ids=lambda f: f.__name__)
def test_unpickler_refuses_builtins_that_run_code(func, tmp_path):
    marker = tmp_path / "ran"
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    args = {exec: (touch,), eval: (touch,),
            getattr: (marker, "touch"), setattr: (marker, "suffix", ".x"), __import__: ("os",),
            compile: ("1", "<x>", "eval")}[func]
    payload = pickle.dumps({"paths": ["a"], "embeddings": [_Call(func, *args)]})
    with pytest.raises(pickle.UnpicklingError, match=f"refusing to unpickle builtins.{func.__name__}"):
        safe_load(payload)
    assert not marker.exists()


def test_unpickler_still_loads_numpy_rows():
    import numpy as np

    rows = [np.arange(4, dtype=np.float32) * i for i in range(3)]
    data = safe_load(pickle.dumps({"paths": ["a", "b", "c"], "embeddings": rows}))
    assert data["paths"] == ["a", "b", "c"] and all(np.array_equal(a, b) for a, b in zip(data["embeddings"], rows))


# ---------------------------------------------------------------- [IMG] rules
def test_img_rules_match_a_hand_written_mask():
    """r=4 [IMG] ids 10..13, vocabulary 16, prompt of 2 tokens; each row's expected scores written out by hand."""
    rules = GILLImageLogitsProcessor([10, 11, 12, 13], prompt_length=2, max_new_tokens=20, num_prompts=3)
    ids = torch.tensor([[1, 2, 5, 6, 7, 8],  # text only
                        [1, 2, 5, 6, 10, 11],  # inside a block, after [IMG1]
                        [1, 2, 10, 11, 12, 13]])  # right after a finished block
    scores = torch.arange(16, dtype=torch.float).repeat(3, 1)  # every [IMG] id outscores the text ids
    out = rules(ids, scores)
    free = scores[0].clone()
    free[11:14] = float("-inf")  # outside a block only [IMG0] may start one
    forced = torch.full((16,), float("-inf"))
    forced[12] = 0.0  # inside a block: exactly the next [IMG]
    assert torch.equal(out[0], free)
    assert torch.equal(out[1], forced)
    assert torch.equal(out[2], free)
    assert out.argmax(-1).tolist() == [15, 12, 15]


# ---------------------------------------------------------------- hidden_layer at generation time
@pytest.mark.parametrize("layer", [-1, -2, 1])
def test_generated_img_states_come_from_hidden_layer(make_model, layer):
    model = make_model("opt", hidden_layer=layer).eval()
    enc = model.processor(["A photo of my dog."], padding_side="left")
    out = model.generate(**enc, max_new_tokens=12, force_image_after=2, max_images=1, eos_token_id=[],
                         return_dict_in_generate=True)
    (slot,) = out.image_slots[0]
    with torch.no_grad():  # the LLM run directly over prompt + answer
        states = model.language_model(inputs_embeds=model.embed_tokens(out.sequences),
                                      output_hidden_states=True).hidden_states
    block = slice(out.prompt_length + slot.position, out.prompt_length + slot.position + model.config.num_img_tokens)
    torch.testing.assert_close(slot.hidden_states, states[layer][0, block], rtol=1e-4, atol=1e-5)
    other = -2 if layer == -1 else -1
    assert not torch.allclose(slot.hidden_states, states[other][0, block], atol=1e-3)


# ---------------------------------------------------------------- retrieval index
def test_excluded_candidates_score_minus_infinity():
    g = torch.Generator().manual_seed(3)
    candidates, query = torch.randn(6, 8, generator=g), torch.randn(1, 8, generator=g)
    index = RetrievalIndex(candidates, [str(i) for i in range(6)], logit_scale=1.5, dtype=torch.float32)
    exclude = torch.tensor([[True, False, True, True, False, True]])
    scores, indices = index.search(query, k=4, chunk_size=4, exclude=exclude)
    cos = F.normalize(query, dim=-1) @ F.normalize(candidates, dim=-1).t()  # brute force over the 2 allowed rows
    allowed = sorted([1, 4], key=lambda j: -cos[0, j].item())
    assert indices[0, :2].tolist() == allowed
    torch.testing.assert_close(scores[0, :2], cos[0, allowed] * math.exp(1.5))
    assert torch.isneginf(scores[0, 2:]).all() and set(indices[0, 2:].tolist()) <= {0, 2, 3, 5}


class _SpyIndex:
    """Delegates to a FAISS index and counts its searches."""

    def __init__(self, index):
        self.index, self.calls = index, 0
        self.d, self.ntotal, self.metric_type = index.d, index.ntotal, index.metric_type

    def search(self, queries, k):
        self.calls += 1
        return self.index.search(queries, k)


def test_faiss_path_runs_and_matches_the_exact_top_k():
    faiss = pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(4)
    candidates, queries = torch.randn(200, 16, generator=g), torch.randn(5, 16, generator=g)
    index = RetrievalIndex(candidates, [str(i) for i in range(200)], logit_scale=2.0, dtype=torch.float32)
    exact_scores, exact_idx = index.search(queries, k=6)
    flat = faiss.IndexFlatIP(16)
    flat.add(F.normalize(candidates, dim=-1).numpy())
    spy = _SpyIndex(flat)
    index.use_faiss(spy)
    scores, idx = index.search(queries, k=6)
    assert spy.calls == 1  # FAISS answered, not the exact scan
    assert torch.equal(idx, exact_idx)
    torch.testing.assert_close(scores, exact_scores, rtol=1e-5, atol=1e-5)
    index.search(queries, k=6, exclude=torch.zeros(5, 200, dtype=torch.bool))  # exclusion bypasses FAISS
    assert spy.calls == 1
    assert isinstance(RetrievalIndex(candidates, [str(i) for i in range(200)]).use_faiss()._faiss, faiss.IndexFlatIP)


# ---------------------------------------------------------------- pipeline: de-duplication, decision
def _queries(pipe, generation):
    with torch.no_grad():
        return pipe.gill_model.text_retrieval_embeddings(generation.img0_hidden_states())


def _retrieve(pipe, index, **kwargs):
    pipe.retrieval_index = index
    try:
        return pipe(PROMPT, **kwargs)
    finally:
        pipe.retrieval_index = None


def test_two_images_of_one_answer_are_distinct_retrievals(pipe):
    g = torch.Generator().manual_seed(5)
    probe = RetrievalIndex(torch.randn(3, 256, generator=g), ["a", "b", "c"], dtype=torch.float32)
    q = _queries(pipe, _retrieve(pipe, probe, decision="retrieve", **TWO_IMAGES).generation)  # (2, p)
    assert q.shape[0] == 2
    shared = F.normalize(q, dim=-1).sum(0)  # row 0 is the best candidate of both queries
    rows = torch.cat([shared[None], torch.randn(5, 256, generator=g)])
    index = RetrievalIndex(rows, [f"c{i}" for i in range(6)], logit_scale=1.0, dtype=torch.float32)
    cos = F.normalize(q, dim=-1) @ F.normalize(rows, dim=-1).t()  # (2, 6)
    assert cos.argmax(1).tolist() == [0, 0]
    out = _retrieve(pipe, index, decision="retrieve", num_candidates=2, **TWO_IMAGES)
    first, second = [p for p in out.parts if isinstance(p, ImagePart)]
    second_best = [j for j in cos[1].argsort(descending=True).tolist() if j != 0]
    assert first.path == "c0" and second.path == f"c{second_best[0]}"
    assert [c[0] for c in second.candidates] == [f"c{j}" for j in second_best[:2]]
    assert second.score == pytest.approx(cos[1, second_best[0]].item() * math.e, rel=1e-5)
    single = RetrievalIndex(rows[:1], ["only"], dtype=torch.float32)  # one candidate: shown again, not dropped
    assert [p.path for p in _retrieve(pipe, single, decision="retrieve", **TWO_IMAGES).parts
            if isinstance(p, ImagePart)] == ["only", "only"]


def test_decision_threshold_comes_from_the_config(make_model):
    model = make_model("opt").eval()
    state = torch.randn(1, model.config.llm_feature_dim, generator=torch.Generator().manual_seed(6))
    linear = model.adapter.decision_head[1]
    logits = state @ linear.weight.t() + linear.bias
    p = (logits[0, 1].exp() / logits[0].exp().sum()).item()
    try:
        for threshold, mode in ((p - 1e-4, "ret"), (p + 1e-4, "gen")):
            model.config.decision_threshold = threshold
            (d,) = decide(model, state)
            assert (d.mode, d.threshold) == (mode, threshold) and d.p_retrieve == pytest.approx(p, abs=1e-6)
    finally:
        model.config.decision_threshold = 0.5


def test_pipeline_auto_decision_reads_the_config_threshold(pipe):
    index = RetrievalIndex(torch.randn(4, 256, generator=torch.Generator().manual_seed(7)), list("abcd"))
    config = pipe.gill_model.config
    try:
        modes = []
        for threshold in (0.0, 1.0):
            config.decision_threshold = threshold
            part = _retrieve(pipe, index, decision="auto", **FAST).parts[1]
            modes.append((part.kind, part.decision.threshold))
    finally:
        config.decision_threshold = 0.5
    assert modes == [("retrieved", 0.0), ("generated", 1.0)]


def test_retrieval_score_feature_is_the_unscaled_max_cosine(make_model):
    model = make_model("opt", decision_use_retrieval_score=True).eval()
    with torch.no_grad():
        model.adapter.decision_head[1].weight[:, -1] = torch.tensor([-2.0, 2.0])  # the score feature matters
    pipeline = GILLPipeline.from_gill(model)
    pipeline.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(8)
    rows = torch.randn(5, 256, generator=g)
    index = RetrievalIndex(rows, list("abcde"), logit_scale=2.5, dtype=torch.float32)
    out = _retrieve(pipeline, index, decision="auto", decision_threshold=1.0, **FAST)  # never retrieve
    img0 = out.generation.img0_hidden_states()
    with torch.no_grad():
        cos = F.normalize(model.adapter.w_t2i(img0), dim=-1) @ F.normalize(rows, dim=-1).t()
        features = torch.cat([img0, cos.max(1).values[:, None]], 1)
        logits = model.adapter.decision_head[1](features)
    expected = torch.softmax(logits, -1)[0, 1].item()
    assert out.parts[1].decision.p_retrieve == pytest.approx(expected, abs=1e-6)
