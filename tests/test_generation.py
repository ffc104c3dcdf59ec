"""generate() is transformers' GenerationMixin: GILL's [IMG] rules under every decoding strategy, the captured [IMG]
states, cache vs no cache, batches, streamers, stopping, the inference forward and the boundary errors."""

import threading
import warnings

import pytest
import torch
from PIL import Image
from transformers import (LogitsProcessor, LogitsProcessorList, RepetitionPenaltyLogitsProcessor, StoppingCriteria,
                          StoppingCriteriaList, TextIteratorStreamer, TextStreamer)

from gill_hf import GILLForConditionalGeneration, GILLImageLogitsProcessor
from gill_hf.generation_gill import image_conditioning

PROMPTS = [
    ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the same dog at the beach."],
    ["a cat"],
    ["Q: what is on the left? A:"],
]
NO_EOS = dict(eos_token_id=None)  # fixed lengths: the tiny random LLMs may emit EOS anywhere

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def opt_model(make_model):
    return make_model("opt").eval()


def _encode(model, prompts):
    return model.processor(prompts, padding_side="left")


def _generate(model, prompts, **kwargs):
    kwargs = {**NO_EOS, "return_dict_in_generate": True, **kwargs}
    return model.generate(**_encode(model, prompts), **kwargs)


def reference_decode(model, prompt, max_new_tokens, force_image_after=None, min_text_tokens=0, max_images=None,
                     eos=None, repetition_penalty=None):
    """GILL's decoding rules written out as a plain uncached greedy loop over ``model.forward``: the independent
    reference ``generate`` must match (new ids of one prompt)."""
    enc = _encode(model, [prompt])
    img = model.config.img_token_ids
    r, new = len(img), []
    while len(new) < max_new_tokens:
        seq = torch.cat([enc["input_ids"], torch.tensor([new], dtype=torch.long)], 1)
        with torch.no_grad():
            logits = model(input_ids=seq, pixel_values=enc.get("pixel_values")).logits[0, -1].float()
        if repetition_penalty is not None:
            logits = RepetitionPenaltyLogitsProcessor(repetition_penalty)(seq, logits[None])[0]
        if new and new[-1] in img[:-1]:
            token = img[img.index(new[-1]) + 1]
        else:
            last_end = max((i + 1 for i, t in enumerate(new) if t == img[-1]), default=0)
            since = len(new) - last_end
            allowed = (len(new) + r <= max_new_tokens and since >= min_text_tokens
                       and (max_images is None or new.count(img[0]) < max_images))
            logits[img[1:]] = float("-inf")
            if not allowed:
                logits[img[0]] = float("-inf")
            forced = allowed and force_image_after is not None and since >= force_image_after
            token = img[0] if forced else int(logits.argmax())
        new.append(token)
        if eos is not None and token == eos:
            break
    return new


def _assert_same_images(a, b, atol=1e-5):
    assert [s.position for s in a] == [s.position for s in b]
    for x, y in zip(a, b):
        torch.testing.assert_close(x.hidden_states, y.hidden_states, atol=atol, rtol=1e-4)
        torch.testing.assert_close(x.voken_states, y.voken_states, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("llm,position", [("opt", "at_token"), ("llama", "predicting")])
def test_generate_matches_the_reference_loop_cached_and_uncached(make_model, llm, position):
    model = make_model(llm, voken_feature_position=position).eval()
    assert model.can_generate()
    for b, force in enumerate([3, 5, 2]):
        want = reference_decode(model, PROMPTS[b], 30, force_image_after=force, max_images=2)
        for use_cache in (True, False):
            out = _generate(model, [PROMPTS[b]], max_new_tokens=30, force_image_after=force, max_images=2,
                            use_cache=use_cache)
            assert out.new_tokens[0].tolist() == want, (b, use_cache)
            assert len(out.images[0]) == 2


@pytest.mark.parametrize("llm", ["opt", "llama"])
def test_batched_equals_one_at_a_time(make_model, llm):
    model = make_model(llm).eval()
    forced = [3, 6, 1]  # different image positions per row
    batched = _generate(model, PROMPTS, max_new_tokens=24, force_image_after=forced, max_images=2)
    for b, prompt in enumerate(PROMPTS):
        single = _generate(model, [prompt], max_new_tokens=24, force_image_after=forced[b], max_images=2)
        assert torch.equal(batched.new_tokens[b], single.new_tokens[0])
        assert batched.texts[b] == single.texts[0]
        _assert_same_images(batched.images[b], single.images[0], atol=1e-4)


def test_states_of_a_row_after_rows_without_images(opt_model):
    """Only rows holding an image run the state forward: each still gets its own sequence's states."""
    batched = _generate(opt_model, PROMPTS, max_new_tokens=20, force_image_after=[None, None, 4], max_images=1)
    assert [len(row) for row in batched.images] == [0, 0, 1]
    single = _generate(opt_model, [PROMPTS[2]], max_new_tokens=20, force_image_after=4, max_images=1)
    _assert_same_images(batched.images[2], single.images[0], atol=1e-4)


def test_img_states_match_a_training_style_forward(make_model):
    """The captured states are hidden_states[hidden_layer] at the [IMG] positions of the whole sequence (and one
    position earlier for 'predicting'), exactly what the training objective takes."""
    model = make_model("llama", voken_feature_position="predicting").eval()
    enc = _encode(model, [PROMPTS[0]])
    out = model.generate(**enc, max_new_tokens=20, force_image_after=2, max_images=1, return_dict_in_generate=True,
                         **NO_EOS)
    ids = out.sequences
    assert torch.equal(ids[:, :enc["input_ids"].shape[1]], enc["input_ids"])  # prompt + new ids, as transformers
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
    for s in slots:
        assert out.new_tokens[0, s.position:s.position + r].tolist() == opt_model.config.img_token_ids
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
    assert not torch.isin(plain.new_tokens, torch.tensor(opt_model.config.img_token_ids)).any()


def test_image_only_starts_when_the_block_fits(opt_model):
    r = opt_model.config.num_img_tokens
    out = _generate(opt_model, [PROMPTS[1]], max_new_tokens=r + 2, force_image_after=2)
    assert [s.position for s in out.images[0]] == [2] and out.new_tokens.shape[1] == r + 2
    # never a cut block: the boost wants [IMG0] at every step, but after 3 text tokens the block no longer fits
    out = _generate(opt_model, [PROMPTS[1]], max_new_tokens=r + 2, gen_scale_factor=1e5, min_text_tokens=3)
    assert out.images == [[]] and not torch.isin(out.new_tokens, torch.tensor(opt_model.config.img_token_ids)).any()
    with pytest.raises(ValueError, match="force_image_after=3 cannot be met"):
        _generate(opt_model, [PROMPTS[1]], max_new_tokens=r + 2, force_image_after=3)


def test_sampling_is_seeded_and_top_k_1_is_greedy(opt_model):
    def sample(seed, **kw):
        torch.manual_seed(seed)
        return _generate(opt_model, PROMPTS, max_new_tokens=12, do_sample=True, **kw).sequences

    assert torch.equal(sample(1, temperature=0.7, top_p=0.9), sample(1, temperature=0.7, top_p=0.9))
    assert not torch.equal(sample(1, temperature=1.5), sample(2, temperature=1.5))
    greedy = _generate(opt_model, PROMPTS, max_new_tokens=12).sequences
    assert torch.equal(sample(3, top_k=1), greedy)


def test_beam_search_and_return_sequences_obey_the_image_rules(opt_model):
    r, img = opt_model.config.num_img_tokens, opt_model.config.img_token_ids
    beams = _generate(opt_model, PROMPTS[:2], max_new_tokens=20, num_beams=3, num_return_sequences=2,
                      force_image_after=[2, 4], max_images=1, output_scores=True)
    assert beams.sequences.shape[0] == 4 and beams.sequences_scores.shape == (4,)
    for row, force in zip(range(4), [2, 2, 4, 4]):
        assert [s.position for s in beams.images[row]] == [force]
        assert beams.new_tokens[row, force:force + r].tolist() == img
    one_beam = _generate(opt_model, PROMPTS[:2], max_new_tokens=20, num_beams=1, force_image_after=[2, 4],
                         max_images=1)
    assert torch.equal(one_beam.sequences, _generate(opt_model, PROMPTS[:2], max_new_tokens=20,
                                                     force_image_after=[2, 4], max_images=1).sequences)
    torch.manual_seed(0)
    sampled = _generate(opt_model, [PROMPTS[0]], max_new_tokens=20, do_sample=True, num_return_sequences=3,
                        force_image_after=5, max_images=1)
    assert [[s.position for s in row] for row in sampled.images] == [[5]] * 3
    pixels = _encode(opt_model, [PROMPTS[0]])["pixel_values"]
    width = sampled.prompt_length
    for row in range(3):  # each returned row's states are those of its own sequence
        ids = sampled.sequences[row:row + 1]
        with torch.no_grad():
            embeds = opt_model.embed_inputs(ids, opt_model.encode_images(pixels))
            _, features, _ = opt_model.run_language_model(embeds, torch.ones_like(ids), use_cache=False)
        torch.testing.assert_close(sampled.images[row][0].hidden_states, features[0, width + 5:width + 5 + r],
                                   atol=1e-5, rtol=1e-4)


def test_standard_logits_options_match_the_reference(opt_model):
    want = reference_decode(opt_model, PROMPTS[0], 20, force_image_after=4, max_images=2, repetition_penalty=1.8)
    out = _generate(opt_model, [PROMPTS[0]], max_new_tokens=20, force_image_after=4, max_images=2,
                    repetition_penalty=1.8)
    assert out.new_tokens[0].tolist() == want
    # no_repeat_ngram_size bans repeated n-grams, but the forced [IMG] blocks of the second image still complete
    out = _generate(opt_model, [PROMPTS[0]], max_new_tokens=24, force_image_after=2, max_images=2,
                    no_repeat_ngram_size=2)
    assert len(out.images[0]) == 2
    text = [t for t in out.new_tokens[0].tolist() if t not in opt_model.config.img_token_ids]
    bigrams = list(zip(text, text[1:]))
    assert len(bigrams) == len(set(bigrams))


def test_min_new_tokens_eos_stop_strings_and_stopping_criteria(opt_model):
    greedy = _generate(opt_model, [PROMPTS[1]], max_new_tokens=12)
    first = int(greedy.new_tokens[0, 0])
    assert _generate(opt_model, [PROMPTS[1]], max_new_tokens=12, eos_token_id=first).new_tokens.tolist() == [[first]]
    held = _generate(opt_model, [PROMPTS[1]], max_new_tokens=12, eos_token_id=first, min_new_tokens=4)
    assert held.new_tokens.shape[1] >= 4 and first not in held.new_tokens[0, :4].tolist()

    tokenizer = opt_model.processor.tokenizer
    prefix = tokenizer.decode(greedy.new_tokens[0, :4])
    stop = prefix[-2:]
    out = _generate(opt_model, [PROMPTS[1]], max_new_tokens=12, stop_strings=[stop], tokenizer=tokenizer)
    n = out.new_tokens.shape[1]
    assert n <= 4 and stop in tokenizer.decode(out.new_tokens[0])
    assert torch.equal(out.new_tokens[0], greedy.new_tokens[0, :n])

    class AfterThree(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.stop_at, dtype=torch.bool)

    criteria = AfterThree()
    criteria.stop_at = _encode(opt_model, [PROMPTS[1]])["input_ids"].shape[1] + 3
    out = _generate(opt_model, [PROMPTS[1]], max_new_tokens=12, stopping_criteria=StoppingCriteriaList([criteria]))
    assert torch.equal(out.new_tokens[0], greedy.new_tokens[0, :3])


def test_user_logits_processors_cannot_break_the_image_rules(opt_model):
    img = opt_model.config.img_token_ids
    greedy = _generate(opt_model, [PROMPTS[1]], max_new_tokens=12)
    banned = int(greedy.new_tokens[0, 0])

    class PushImgTokens(LogitsProcessor):
        def __call__(self, input_ids, scores):
            scores = scores.clone()
            scores[:, banned] = float("-inf")
            scores[:, img[3]] = 1e9  # [IMG3] outside a block must stay impossible
            return scores

    out = _generate(opt_model, [PROMPTS[1]], max_new_tokens=12, logits_processor=LogitsProcessorList([PushImgTokens()]))
    assert banned not in out.new_tokens[0].tolist()
    assert not torch.isin(out.new_tokens, torch.tensor(img)).any()


def test_streamers_show_the_text_and_never_img_tokens(opt_model, capsys):
    tokenizer = opt_model.processor.tokenizer
    enc = _encode(opt_model, [PROMPTS[0]])
    kwargs = dict(max_new_tokens=20, force_image_after=3, max_images=1, **NO_EOS)
    out = opt_model.generate(**enc, **kwargs)
    new_text = opt_model.processor.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)[0]
    capsys.readouterr()
    opt_model.generate(**enc, streamer=TextStreamer(tokenizer, skip_prompt=True), **kwargs)
    printed = capsys.readouterr().out
    assert "[IMG" not in printed and "<|image|>" not in printed
    assert printed.strip() == new_text.strip()

    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=60)
    thread = threading.Thread(target=opt_model.generate, kwargs=dict(**enc, streamer=streamer, **kwargs))
    thread.start()
    pieces = list(streamer)
    thread.join(timeout=60)
    assert "".join(pieces).strip() == new_text.strip() and "[IMG" not in "".join(pieces)


def test_tensor_output_decodes_with_the_processor(opt_model):
    enc = _encode(opt_model, PROMPTS[1:])
    out = opt_model.generate(**enc, max_new_tokens=6, **NO_EOS)
    assert isinstance(out, torch.Tensor) and out.shape == (2, enc["input_ids"].shape[1] + 6)
    texts = opt_model.processor.batch_decode(out, skip_special_tokens=True)
    assert texts[0].startswith("a cat") and texts[1].startswith("Q: what is on the left? A:")


def test_inputs_embeds_prompt_returns_new_tokens_only(opt_model):
    enc = _encode(opt_model, [PROMPTS[0]])
    with torch.no_grad():
        embeds = opt_model.embed_inputs(enc["input_ids"], opt_model.encode_images(enc["pixel_values"]))
    kwargs = dict(max_new_tokens=16, force_image_after=3, max_images=1, return_dict_in_generate=True, **NO_EOS)
    from_embeds = opt_model.generate(inputs_embeds=embeds, attention_mask=enc["attention_mask"], **kwargs)
    from_ids = opt_model.generate(**enc, **kwargs)
    assert torch.equal(from_embeds.sequences, from_ids.new_tokens)
    _assert_same_images(from_embeds.images[0], from_ids.images[0])


def test_generation_config_fields_drive_generation_and_round_trip(make_model, tmp_path):
    model = make_model("opt").eval()
    model.generation_config.force_image_after = 2
    model.generation_config.max_images = 1
    model.generation_config.max_new_tokens = 14
    model.generation_config.eos_token_id = None
    out = model.generate(**_encode(model, [PROMPTS[1]]), return_dict_in_generate=True)
    assert [s.position for s in out.images[0]] == [2] and out.new_tokens.shape[1] == 14
    model.save_pretrained(tmp_path)
    again = GILLForConditionalGeneration.from_pretrained(tmp_path).eval()
    for name in ("force_image_after", "max_images", "max_new_tokens", "min_text_tokens", "gen_scale_factor"):
        assert getattr(again.generation_config, name) == getattr(model.generation_config, name), name
    assert torch.equal(again.generate(**_encode(again, [PROMPTS[1]])), model.generate(**_encode(model, [PROMPTS[1]])))


def test_forward_is_the_standard_inference_forward(opt_model):
    enc = _encode(opt_model, [PROMPTS[0]])
    ids, pixels = enc["input_ids"], enc["pixel_values"]
    with torch.no_grad():
        full = opt_model(**enc)
        embeds = opt_model.embed_inputs(ids, opt_model.encode_images(pixels))
        logits, _, _ = opt_model.run_language_model(embeds, enc["attention_mask"], use_cache=False)
        torch.testing.assert_close(full.logits, logits)
        vocab = full.logits.shape[-1]
        assert vocab > max(opt_model.config.img_token_ids) and full.logits[..., opt_model.config.image_token_id].isinf().all()
        # labels: mean next-token CE, computed independently
        labels = ids.masked_fill(ids == opt_model.config.image_token_id, -100)
        loss = opt_model(**enc, labels=labels).loss
        manual = torch.nn.functional.cross_entropy(full.logits[0, :-1], labels[0, 1:], ignore_index=-100)
        torch.testing.assert_close(loss, manual)
        # the cache: the prompt minus its last token, then that token alone, gives the same last logits
        head = opt_model(input_ids=ids[:, :-1], pixel_values=pixels, attention_mask=enc["attention_mask"][:, :-1],
                         use_cache=True)
        step = opt_model(input_ids=ids[:, -1:], attention_mask=enc["attention_mask"], cache=head.cache,
                         use_cache=True)
        torch.testing.assert_close(step.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-4)
        as_tuple = opt_model(**enc, return_dict=False)
        assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], full.logits)
    with pytest.raises(ValueError, match="gill_objective=True"):
        opt_model(**enc, pack=False)
    with pytest.raises(ValueError, match=r"\['logits_to_keep', 'use_cache'\] do not apply to the training"):
        opt_model(**enc, gill_objective=True, use_cache=True, logits_to_keep=1)


def test_pre_encoded_images_generate_the_same(opt_model):
    enc = _encode(opt_model, [PROMPTS[0]])
    kwargs = dict(max_new_tokens=16, force_image_after=3, return_dict_in_generate=True, **NO_EOS)
    with torch.no_grad():
        encoded = opt_model.get_image_features(enc["pixel_values"])
    from_pixels = opt_model.generate(**enc, **kwargs)
    pre = opt_model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                             mm_encoder_outputs={"image": encoded}, **kwargs)
    assert torch.equal(pre.sequences, from_pixels.sequences)
    _assert_same_images(pre.images[0], from_pixels.images[0])
    with pytest.raises(ValueError, match="either pixel_values or mm_encoder_outputs"):
        opt_model.generate(**enc, mm_encoder_outputs={"image": encoded}, max_new_tokens=2)


def test_no_deprecation_or_future_warnings(opt_model):
    enc = _encode(opt_model, [PROMPTS[0]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt_model.generate(**enc, max_new_tokens=12, force_image_after=2, return_dict_in_generate=True, **NO_EOS)
        opt_model.generate(**enc, max_new_tokens=4, do_sample=True, top_p=0.9, temperature=0.8)
        opt_model.generate(**enc, max_new_tokens=4, num_beams=2, use_cache=False)


def test_context_window_is_a_policy(make_model, caplog, monkeypatch):
    model = make_model("opt").eval()
    enc = _encode(model, [PROMPTS[0]])
    length = enc["input_ids"].shape[1]
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", length + 5)
    with caplog.at_level("WARNING"):
        out = model.generate(**enc, max_new_tokens=30, return_dict_in_generate=True, **NO_EOS)
    assert out.new_tokens.shape[1] == 5 and "context window" in caplog.text
    # the forced image no longer fits the window: an error, not a silent text-only answer
    with pytest.raises(ValueError, match="force_image_after=0 cannot be met"):
        model.generate(**enc, max_new_tokens=30, force_image_after=0, **NO_EOS)
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", length - 1)
    with pytest.raises(ValueError, match=f"prompt is {length} tokens long but the LLM's context window is {length - 1}"):
        model.generate(**enc, max_new_tokens=3)


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


def test_bad_inputs_raise_at_the_boundary(opt_model):
    enc = _encode(opt_model, [PROMPTS[0]])
    two_images = torch.cat([enc["pixel_values"]] * 2)
    with pytest.raises(ValueError, match="1 image placeholders .* but 2 images"):
        opt_model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], pixel_values=two_images)
    with pytest.raises(ValueError, match="but 0 images"):
        opt_model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    right = opt_model.processor(PROMPTS[1:], padding_side="right")
    with pytest.raises(ValueError, match="left padding"):
        opt_model.generate(**right)
    with pytest.raises(ValueError, match="max_new_tokens"):
        _generate(opt_model, [PROMPTS[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="2 values for 1 prompts"):
        _generate(opt_model, [PROMPTS[1]], force_image_after=[1, 2])
    with pytest.raises(ValueError, match="force_image_after_tokens"):  # a typo: transformers names it
        _generate(opt_model, [PROMPTS[1]], force_image_after_tokens=2)
    with pytest.raises(ValueError, match="max_images must be >= 0"):
        _generate(opt_model, [PROMPTS[1]], max_images=-1)


def test_rules_processor_alone():
    """The processor on hand-made ids: forced continuation inside a block, gating outside."""
    img = [10, 11, 12]
    proc = GILLImageLogitsProcessor(img, prompt_length=2, max_new_tokens=8, min_text_tokens=1, max_images=1)
    scores = torch.zeros(3, 16)
    ids = torch.tensor([[1, 2, 5, 10], [1, 2, 5, 6], [1, 2, 10, 11]])
    out = proc(ids, scores)
    assert out[0].argmax() == 11 and out[0].isfinite().sum() == 1  # after [IMG0]: [IMG1] only
    assert out[1, 10].isfinite() and out[1, 11:13].isinf().all()  # text so far: [IMG0] allowed, [IMG1..] not
    assert out[2].argmax() == 12 and out[2].isfinite().sum() == 1
    full = proc(torch.tensor([[1, 2, 5, 10, 11, 12, 7]]), torch.zeros(1, 16))
    assert full[0, 10].isinf()  # max_images=1 reached
    late = proc(torch.tensor([[1, 2, 5, 6, 7, 8, 9, 4]]), torch.zeros(1, 16))
    assert late[0, 10].isinf()  # 6 new tokens + 3 > 8: the block no longer fits


def test_image_text_to_text_pipeline_answers_interleaved_prompts(opt_model):
    from transformers import pipeline

    pipe = pipeline("image-text-to-text", model=opt_model, processor=opt_model.processor)
    image = Image.new("RGB", (30, 30), "red")
    for kwargs in (dict(text="a cat"), dict(images=image, text="<|image|> what is on the left?")):
        answer = pipe(**kwargs, return_full_text=False, generate_kwargs=dict(max_new_tokens=6, **NO_EOS))
        answer = answer[0]["generated_text"]
        enc = opt_model.processor(**{k: ([v] if k == "images" else v) for k, v in kwargs.items()})
        ids = opt_model.generate(**enc, max_new_tokens=6, **NO_EOS)[:, enc["input_ids"].shape[1]:]
        assert answer == opt_model.processor.batch_decode(ids, skip_special_tokens=True)[0]
    chat = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is it?"}]}]
    out = pipe(text=chat, generate_kwargs=dict(max_new_tokens=4, **NO_EOS))[0]["generated_text"]
    assert out[-1]["role"] == "assistant" and isinstance(out[-1]["content"], str)


class CountCalls(LogitsProcessor):
    """Counts decoding steps (a check that raises before decoding leaves it at 0)."""

    calls = 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        return scores


def test_forced_images_that_cannot_be_met_raise_before_decoding(opt_model):
    r = opt_model.config.num_img_tokens
    cases = [
        (dict(force_image_after=2, max_images=0), "force_image_after=2 cannot be met with max_images=0"),
        (dict(force_image_after=[None, 1], max_images=0), r"force_image_after=\[None, 1\] cannot be met with max_imag"),
        (dict(force_image_after=0, min_text_tokens=5), f"needs {r + 5} new tokens \\(min_text_tokens=5 \\+ the {r} "
                                                       f"\\[IMG\\] tokens\\) but the budget is {r + 4}"),
        (dict(force_image_after=r + 4), f"force_image_after={r + 4} cannot be met: the image needs {2 * r + 4}"),
        (dict(force_image_after=1.5), "force_image_after must be an int or None, got 1.5"),
        (dict(force_image_after=[1, True]), r"force_image_after must be an int or None, got \[1, True\]"),
        (dict(min_text_tokens="2"), "min_text_tokens must be an int, got '2'"),
        (dict(max_images=1.0), "max_images must be an int or None, got 1.0"),
    ]
    for options, message in cases:
        counter = CountCalls()
        with pytest.raises(ValueError, match=message):
            _generate(opt_model, PROMPTS[1:], max_new_tokens=r + 4, logits_processor=LogitsProcessorList([counter]),
                      **options)
        assert counter.calls == 0, options
    # the limits themselves are met: min_text_tokens delays the forced image to the last position that fits
    out = _generate(opt_model, PROMPTS[1:], max_new_tokens=r + 4, force_image_after=0, min_text_tokens=4)
    assert [[s.position for s in row] for row in out.images] == [[4], [4]]
    assert out.missing_forced_images == [False, False]
    assert _generate(opt_model, PROMPTS[1:], max_new_tokens=r + 4, force_image_after=[None, None],
                     max_images=0).images == [[], []]


def test_forced_image_cut_short_by_stopping_is_flagged_and_warned(opt_model, caplog):
    class AfterTwo(StoppingCriteria):
        def __init__(self, width):
            self.stop_at = width + 2

        def __call__(self, input_ids, scores, **kwargs):
            return torch.full((input_ids.shape[0],), input_ids.shape[1] >= self.stop_at, dtype=torch.bool)

    enc = _encode(opt_model, PROMPTS)
    stop = StoppingCriteriaList([AfterTwo(enc["input_ids"].shape[1])])
    forced = [3, None, 1]  # row 0: stopped before its image; row 2: its [IMG] block is cut after one token
    with caplog.at_level("WARNING"):
        out = opt_model.generate(**enc, max_new_tokens=20, force_image_after=forced, stopping_criteria=stop,
                                 return_dict_in_generate=True, **NO_EOS)
    assert out.new_tokens.shape[1] == 2 and out.new_tokens[2, 1] == opt_model.config.img_token_ids[0]
    assert out.missing_forced_images == [True, False, True] and out.images == [[], [], []]
    assert "force_image_after was not met in row(s) [0, 2]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):  # the tensor output warns too
        opt_model.generate(**enc, max_new_tokens=20, force_image_after=forced, stopping_criteria=stop, **NO_EOS)
    assert "not met in row(s) [0, 2]" in caplog.text
    caplog.clear()
    # EOS before the forced position, with two returned rows per prompt (top_k=1 sampling is greedy)
    first = int(_generate(opt_model, [PROMPTS[1]], max_new_tokens=2).new_tokens[0, 0])
    with caplog.at_level("WARNING"):
        out = _generate(opt_model, PROMPTS[:2], max_new_tokens=12, force_image_after=[None, 3], eos_token_id=first,
                        do_sample=True, top_k=1, num_return_sequences=2)
    assert out.new_tokens[2:, 0].tolist() == [first, first]
    assert out.missing_forced_images == [False, False, True, True] and "row(s) [2, 3]" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        out = opt_model.generate(**enc, max_new_tokens=20, force_image_after=forced, return_dict_in_generate=True,
                                 **NO_EOS)
    assert out.missing_forced_images == [False, False, False] and "not met" not in caplog.text


def test_pipeline_options_that_cannot_apply_raise_before_the_llm(opt_model, monkeypatch):
    from gill_hf import GILLPipeline, RetrievalIndex

    pipe = GILLPipeline.from_gill(opt_model)

    def forbidden(*args, **kwargs):
        raise AssertionError("the LLM or the UNet ran before the options were checked")

    monkeypatch.setattr(opt_model, "generate", forbidden)
    monkeypatch.setattr(pipe, "_diffuse", forbidden)
    cfg = opt_model.config
    embeds = torch.zeros(1, cfg.num_gen_queries, cfg.gen_emb_dim)
    side = pipe.vae_scale_factor
    cases = [
        (dict(num_inference_steps=0), "num_inference_steps must be >= 1, got 0"),
        (dict(height=side + 1), f"height must be a positive multiple of {side}, got {side + 1}"),
        (dict(prompt=None, prompt_embeds=embeds, max_new_tokens=4, decision="generate"),
         r"prompt_embeds skips the LLM and the decision: \['decision', 'max_new_tokens'\] do not apply"),
        (dict(negative_prompt_embeds=embeds), "negative_prompt_embeds goes with prompt_embeds"),
        (dict(num_candidates=0), "num_candidates must be >= 1, got 0"),
        (dict(decision_threshold=1.5), r"decision_threshold must lie in \[0, 1\], got 1.5"),
        (dict(decision_threshold=0.5), "applies to decision='auto' with a retrieval_index; here every image is "
                                       "generated"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            pipe(**{"prompt": PROMPTS[1], **options})
    pipe.retrieval_index = RetrievalIndex(torch.randn(3, cfg.ret_emb_dim), ["a.png", "b.png", "c.png"])
    with pytest.raises(ValueError, match="here every image is retrieved"):
        pipe(PROMPTS[1], decision="retrieve", decision_threshold=0.5)
