"""gill_hf.scoring: continuation log-likelihoods over a cached prompt vs a full forward per candidate, batching,
the prompt encoded once, refusals; image ranking vs the retrieval heads applied by hand."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gill_hf import rank_images, score_continuations

CANDIDATES = [" a red circle on the left", " dog", " a blue square at the top of the big house", " the sky"]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module", params=["opt", "llama"])
def model(request, make_model):
    return make_model(request.param, seed=1).eval()


def prompt():
    return ["a picture of", Image.new("RGB", (40, 36), "red"), "it shows"]


@torch.no_grad()
def brute_force(model, candidate: str) -> torch.Tensor:
    """Per-token log-probs of ``candidate`` from one uncached forward over prompt + candidate."""
    enc = model.processor(prompt())
    ids = model.processor.tokenizer(candidate, add_special_tokens=False)["input_ids"]
    full = torch.cat([enc["input_ids"], torch.tensor([ids])], 1)
    logits = model(input_ids=full, attention_mask=torch.ones_like(full), pixel_values=enc["pixel_values"]).logits
    start = enc["input_ids"].shape[1] - 1
    return logits[0, start:start + len(ids)].float().log_softmax(-1).gather(-1, torch.tensor(ids)[:, None])[:, 0]


def test_cached_scores_equal_a_full_forward_per_candidate(model):
    expected = [brute_force(model, c) for c in CANDIDATES]
    per_token = model.score_continuations(prompt(), CANDIDATES, reduction="none")
    for got, want in zip(per_token, expected):
        torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(model.score_continuations(prompt(), CANDIDATES),
                               torch.stack([e.sum() for e in expected]), **TOL)
    torch.testing.assert_close(score_continuations(model, model.processor(prompt()), CANDIDATES, reduction="mean"),
                               torch.stack([e.mean() for e in expected]), **TOL)


def test_batched_equals_unbatched(model):
    one = model.score_continuations(prompt(), CANDIDATES, batch_size=1)
    for batch_size in (3, 8):
        torch.testing.assert_close(model.score_continuations(prompt(), CANDIDATES, batch_size=batch_size), one, **TOL)
    torch.testing.assert_close(model.score_continuations(prompt(), CANDIDATES[1]), one[1], **TOL)  # a single text
    assert model.score_continuations(prompt(), CANDIDATES[1]).dim() == 0


def test_the_prompt_runs_once(model):
    """One LLM pass over the whole prompt, then one per batch over the candidate tokens only."""
    lengths = []
    hook = model.language_model.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[:2]), with_kwargs=True)
    try:
        model.score_continuations(prompt(), CANDIDATES, batch_size=3)
    finally:
        hook.remove()
    width = max(len(model.processor.tokenizer(c, add_special_tokens=False)["input_ids"]) for c in CANDIDATES[:3])
    assert lengths == [(1, model.processor(prompt())["input_ids"].shape[1]), (3, width),
                       (1, len(model.processor.tokenizer(CANDIDATES[3], add_special_tokens=False)["input_ids"]))]


def test_refusals(model):
    with pytest.raises(ValueError, match="reduction must be one of"):
        model.score_continuations(prompt(), CANDIDATES, reduction="max")
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        model.score_continuations(prompt(), CANDIDATES, batch_size=0)
    with pytest.raises(ValueError, match=r"candidates \[1\] tokenize to no tokens"):
        model.score_continuations(prompt(), [" dog", ""])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        model.score_continuations(prompt(), [])
    with pytest.raises(ValueError, match=r"one prompt is scored at a time: input_ids must be \(1, T\)"):
        model.score_continuations(model.processor([prompt(), ["two"]]), CANDIDATES)
    with pytest.raises(ValueError, match="more than the context window"):
        model.score_continuations(prompt(), [" dog" * 600])
    with pytest.raises(ValueError, match="prompt must hold input_ids"):
        model.score_continuations({**model.processor(prompt()), "labels": None}, CANDIDATES)


@torch.no_grad()
def test_rank_images_is_the_originals_rerank(model):
    images = [Image.new("RGB", (32, 32), c) for c in ("red", "blue", "yellow")]
    # By hand: the [IMG0] state of "<bos> text [IMG0..]" from the LLM, W_t2i; pooled CLIP, W_i2t; cosines.
    tok, a = model.processor.tokenizer, model.adapter
    ids = [tok.bos_token_id] + tok("a red circle", add_special_tokens=False)["input_ids"] + model.config.img_token_ids
    embeds = torch.cat([model.language_model.get_input_embeddings()(torch.tensor(ids[:-8])), a.img_embeddings])
    hidden = model.language_model(inputs_embeds=embeds[None], output_hidden_states=True).hidden_states[-1][0]
    query = F.linear(hidden[len(ids) - 8], a.w_t2i.weight, a.w_t2i.bias)
    pooled = model.vision_model(pixel_values=model.processor.preprocess_images(images)).pooler_output
    keys = F.linear(pooled, a.w_i2t.weight, a.w_i2t.bias)
    expected = F.normalize(keys, dim=-1) @ F.normalize(query, dim=0)

    scores, order = rank_images(model, "a red circle", images)
    torch.testing.assert_close(scores, expected, **TOL)
    assert order.tolist() == expected.argsort(descending=True).tolist()
    scaled, _ = rank_images(model, hidden[len(ids) - 8], images, scale=True)  # an [IMG0] state as the query
    torch.testing.assert_close(scaled, expected * a.logit_scale.exp(), **TOL)
    with pytest.raises(ValueError, match=r"a query state must be \(64,\)"):
        rank_images(model, torch.zeros(3), images)
    with pytest.raises(ValueError, match="at least one image"):
        rank_images(model, "a red circle", [])
