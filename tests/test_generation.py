"""Interleaved decoding: cache vs no cache, batch vs single, several images, sampling, stops, budgets, errors."""

import pytest
import torch
from PIL import Image

from gill_hf.generation_gill import generate_interleaved, image_conditioning

PROMPTS = [
    ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the same dog at the beach."],
    ["a cat"],
    ["Q: what is on the left? A:"],
]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def opt_model(make_model):
    return make_model("opt").eval()


def _encode(model, prompts):
    return model.processor(prompts, padding_side="left")


def _generate(model, prompts, **kwargs):
    kwargs.setdefault("eos_token_id", [])  # fixed lengths: the tiny random LLMs may emit EOS anywhere
    enc = _encode(model, prompts)
    return generate_interleaved(model, enc["input_ids"], enc["attention_mask"], enc.get("pixel_values"), **kwargs)


def _assert_same_images(a, b, atol=1e-5):
    assert [s.position for s in a] == [s.position for s in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x.hidden_states, y.hidden_states, atol=atol, rtol=1e-4)
        torch.testing.assert_close(x.voken_states, y.voken_states, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("llm,position", [("opt", "at_token"), ("llama", "predicting")])
def test_cached_equals_uncached(make_model, llm, position):
    model = make_model(llm, voken_feature_position=position).eval()
    kwargs = dict(max_new_tokens=30, force_image_after=[3, 5, 2], max_images=2)
    cached = _generate(model, PROMPTS, use_cache=True, **kwargs)
    uncached = _generate(model, PROMPTS, use_cache=False, **kwargs)
    assert torch.equal(cached.sequences, uncached.sequences)
    assert [len(row) for row in cached.images] == [2, 2, 2]
    for a, b in zip(cached.images, uncached.images):
        _assert_same_images(a, b)


@pytest.mark.parametrize("llm", ["opt", "llama"])
def test_batched_equals_one_at_a_time(make_model, llm):
    model = make_model(llm).eval()
    # different image positions per row, so some steps mix a row's [IMG] block with other rows' text tokens
    forced = [3, 6, 1]
    batched = _generate(model, PROMPTS, max_new_tokens=24, force_image_after=forced, max_images=2)
    for b, prompt in enumerate(PROMPTS):
        single = _generate(model, [prompt], max_new_tokens=24, force_image_after=forced[b], max_images=2)
        n = single.sequences.shape[1]
        assert torch.equal(batched.sequences[b, :n], single.sequences[0])
        assert batched.texts[b] == single.texts[0]
        _assert_same_images(batched.images[b], single.images[0], atol=1e-4)


def test_img_states_match_a_training_style_forward(make_model):
    """The captured states are hidden_states[hidden_layer] at the [IMG] positions of the whole sequence (and one
    position earlier for 'predicting'), exactly what forward() takes in training."""
    model = make_model("llama", voken_feature_position="predicting").eval()
    enc = _encode(model, [PROMPTS[0]])
    out = generate_interleaved(model, enc["input_ids"], enc["attention_mask"], enc["pixel_values"],
                               max_new_tokens=20, force_image_after=2, max_images=1, eos_token_id=[])
    ids = torch.cat([enc["input_ids"], out.sequences], dim=1)
    with torch.no_grad():
        embeds = model.embed_inputs(ids, model.encode_images(enc["pixel_values"]))
        _, features, _ = model.run_language_model(embeds, torch.ones_like(ids), use_cache=False)
    rows, cols = model.img_block_positions(ids)
    slot = out.images[0][0]
    assert cols[0, 0] == enc["input_ids"].shape[1] + slot.position
    torch.testing.assert_close(slot.hidden_states, features[rows[0], cols[0]], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(slot.voken_states, features[rows[0], cols[0] - 1], atol=1e-5, rtol=1e-4)


def test_several_images_in_one_answer(opt_model):
    r = opt_model.config.num_img_tokens
    out = _generate(opt_model, [PROMPTS[0]], max_new_tokens=40, force_image_after=4, max_images=3)
    slots = out.images[0]
    assert [s.position for s in slots] == [4, 4 + r + 4, 4 + 2 * (r + 4)]
    img_ids = opt_model.img_token_ids
    for s in slots:
        assert torch.equal(out.sequences[0, s.position:s.position + r], img_ids)
        assert s.hidden_states.shape == (r, opt_model.config.llm_feature_dim)
    kinds = [type(p).__name__ for p in out.parts[0]]
    assert kinds == ["str", "GeneratedImageSlot"] * 3 + ["str"]
    assert out.voken_states().shape == (3, r, opt_model.config.llm_feature_dim)


def test_scale_factor_and_min_text_tokens(opt_model):
    """The original's boost makes [IMG0] win as soon as it is allowed; min_text_tokens delays it."""
    out = _generate(opt_model, PROMPTS[:2], max_new_tokens=16, gen_scale_factor=1e5, min_text_tokens=3, max_images=1)
    assert [[s.position for s in row] for row in out.images] == [[3], [3]]
    plain = _generate(opt_model, PROMPTS[:2], max_new_tokens=16)
    assert plain.images == [[], []]


def test_image_only_starts_when_the_block_fits(opt_model):
    r = opt_model.config.num_img_tokens
    out = _generate(opt_model, [PROMPTS[1]], max_new_tokens=r + 2, force_image_after=3)
    assert out.images == [[]] and out.sequences.shape[1] == r + 2
    out = _generate(opt_model, [PROMPTS[1]], max_new_tokens=r + 2, force_image_after=2)
    assert [s.position for s in out.images[0]] == [2] and out.sequences.shape[1] == r + 2


def test_sampling_is_seeded_and_top_k_1_is_greedy(opt_model):
    def sample(seed, **kw):
        return _generate(opt_model, PROMPTS, max_new_tokens=12, do_sample=True,
                         generator=torch.Generator().manual_seed(seed), **kw).sequences

    assert torch.equal(sample(1, temperature=0.7, top_p=0.9), sample(1, temperature=0.7, top_p=0.9))
    assert not torch.equal(sample(1, temperature=1.5), sample(2, temperature=1.5))
    greedy = _generate(opt_model, PROMPTS, max_new_tokens=12).sequences
    assert torch.equal(sample(3, top_k=1), greedy)


def test_eos_and_stop_strings_end_rows(opt_model):
    greedy = _generate(opt_model, [PROMPTS[1]], max_new_tokens=12)
    first = int(greedy.sequences[0, 0])
    out = _generate(opt_model, [PROMPTS[1]], max_new_tokens=12, eos_token_id=[first])
    assert out.sequences.tolist() == [[first]]
    tokenizer = opt_model.processor.tokenizer
    prefix = tokenizer.decode(greedy.sequences[0, :4])
    stop = prefix[-2:]
    out = _generate(opt_model, [PROMPTS[1]], max_new_tokens=12, stop_strings=[stop])
    n = out.sequences.shape[1]
    assert n <= 4 and stop in tokenizer.decode(out.sequences[0]) and stop not in tokenizer.decode(out.sequences[0, :n - 1])
    assert torch.equal(out.sequences[0], greedy.sequences[0, :n])


def test_image_conditioning_and_mapped_null(make_model):
    model = make_model("opt", cfg_dropout_prob=0.1).eval()
    out = _generate(model, [PROMPTS[1]], max_new_tokens=10, force_image_after=0)
    voken = out.voken_states()
    prompt_embeds, negative = image_conditioning(model, voken)
    cfg = model.config
    assert prompt_embeds.shape == (1, cfg.num_gen_queries, cfg.gen_emb_dim)
    with torch.no_grad():
        torch.testing.assert_close(prompt_embeds, model.gen_embeddings(voken))
        torch.testing.assert_close(negative, model.mapped_null_embedding())
    plain = make_model("opt").eval()
    assert image_conditioning(plain, voken)[1] is None


def test_bad_inputs_raise(opt_model):
    enc = _encode(opt_model, [PROMPTS[0]])
    two_images = torch.cat([enc["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="1 image placeholders .* but 2 images"):
        generate_interleaved(opt_model, enc["input_ids"], enc["attention_mask"], two_images)
    with pytest.raises(ValueError, match="but 0 images"):
        generate_interleaved(opt_model, enc["input_ids"], enc["attention_mask"])
    right = opt_model.processor(PROMPTS[1:], padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        generate_interleaved(opt_model, right["input_ids"], right["attention_mask"])
    with pytest.raises(ValueError, match="max_new_tokens"):
        _generate(opt_model, [PROMPTS[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        _generate(opt_model, [PROMPTS[1]], do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="2 values for 1 prompts"):
        _generate(opt_model, [PROMPTS[1]], force_image_after=[1, 2])


def test_model_generate_method(opt_model):
    enc = _encode(opt_model, [PROMPTS[1]])
    out = opt_model.generate(enc["input_ids"], enc["attention_mask"], max_new_tokens=5)
    assert torch.equal(out.sequences, _generate(opt_model, [PROMPTS[1]], max_new_tokens=5).sequences)
