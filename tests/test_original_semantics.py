"""The original's cross-entropies on demand: l_c, l_p and the log-likelihood computed here the original's way
(gill-as-coded.md §1.5, §3.2: Python loops over token lists, the LLM run directly on one embedding table, no
attention mask, HF's token-mean CE over the whole resized vocabulary) match the model's to 1e-6 in fp32, for both
settings of the two switches, with packing on and captions of different lengths; the converter's
``--original-semantics`` writes a config that reproduces them."""

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from gill_hf import GILLForConditionalGeneration
from gill_hf.cli import main as cli_main
from gill_hf.configuration_gill import ORIGINAL_SEMANTICS
from gill_hf.tiny import build_tiny_release

CAPTIONS = ["a red circle on the left side of the big house", "a blue square", "a yellow star in the middle",
            "a green triangle at the bottom of the picture"]
COLOURS = ["red", "blue", "yellow", "green"]
TOL = dict(rtol=1e-6, atol=1e-6)
GILL_DEFAULTS = {"mask_image_token_logit": True, "packed_lp_first_caption_only": False}


def resized_model(make_model, **overrides):
    """A tiny OPT GILL whose LLM is resized to len(tokenizer) as the original's (a row for <|image|>)."""
    model = make_model("opt", seed=3, pack_prob=1.0, **overrides)
    model.resize_token_embeddings(len(model.processor.tokenizer))
    return model


def batch(model):
    enc = model.processor.encode_captions(CAPTIONS, max_length=40)
    pixels = model.processor.preprocess_images([Image.new("RGB", (40, 36), c) for c in COLOURS])
    return enc["input_ids"], enc["attention_mask"], pixels


# ---------------------------------------------------------------------------------------------- the original
def hf_ce(logits: torch.Tensor, labels: list[list[int]], placeholder: int, mask_placeholder: bool) -> torch.Tensor:
    """OPTForCausalLM(labels=...)'s loss: shift, token-mean CE over every unmasked label of the batch."""
    labels = torch.tensor(labels)
    if mask_placeholder:  # gill_hf's default: the softmax runs over one token fewer
        logits = logits.clone()
        logits[..., placeholder] = float("-inf")
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def pad_rows(rows: list[list], value) -> list[list]:
    width = max(len(r) for r in rows)
    return [r + [value] * (width - len(r)) for r in rows]


def original_lp(model, ids, mask, first_caption_only: bool, mask_placeholder: bool) -> torch.Tensor:
    """models.py retrieval/generation mode with concat_captions: rows (2i, 2i+1) joined, the second's <bos>
    dropped, then labels masked from the first pad or [IMG1..] onward (or, gill_hf's default, every valid
    caption token and [IMG0] kept)."""
    llm, cfg = model.language_model, model.config
    pad = llm.config.pad_token_id
    rows = [ids[i, :int(mask[i].sum())].tolist() for i in range(ids.shape[0])]
    packed = [rows[i] + rows[i + 1][1:] for i in range(0, len(rows), 2)]
    tokens = pad_rows(packed, pad)
    later_img = set(cfg.img_token_ids[1:])
    labels = []
    for row, length in zip(tokens, (len(p) for p in packed)):
        label = list(row)
        for k, token in enumerate(label):
            if k >= length:
                label[k] = -100
            elif first_caption_only and (token == pad or token in later_img):
                label[k:] = [-100] * (len(label) - k)
                break
            elif token in later_img:
                label[k] = -100
        labels.append(label)
    embeds = llm.get_input_embeddings()(torch.tensor(tokens))  # one table: the [IMG] rows are E_img
    logits = llm(inputs_embeds=embeds).logits  # no attention mask, as the original
    return hf_ce(logits, labels, cfg.image_token_id, mask_placeholder)


def original_lc(model, ids, mask, pixels, mask_placeholder: bool) -> torch.Tensor:
    """models.py captioning mode with concat_captions: [vis_a, <bos> cap_a, vis_b, cap_b, padding_a, padding_b]
    where padding is each row's [IMG] tokens and pads (all labels -100 from the first [IMG] or pad)."""
    llm, cfg, k = model.language_model, model.config, model.config.num_visual_tokens
    pad, img = llm.config.pad_token_id, set(cfg.img_token_ids)
    table = llm.get_input_embeddings()
    pooled = model.vision_model(pixel_values=pixels).pooler_output
    prefix = F.linear(pooled, model.adapter.w_cap.weight, model.adapter.w_cap.bias).view(len(pooled), k, -1)
    embeds, labels, cut = [], [], []
    for i in range(ids.shape[0]):
        row = ids[i].tolist()
        embeds.append(torch.cat([prefix[i], table(ids[i])]))
        label = [-100] * k + row
        stop = next(j for j, t in enumerate(label) if t == pad or t in img)
        labels.append(label[:stop] + [-100] * (len(label) - stop))
        cut.append(stop)
    seq_embeds, seq_labels = [], []
    for a, b in ((i, i + 1) for i in range(0, len(embeds), 2)):
        first, second = embeds[a][:cut[a]], torch.cat([embeds[b][:k], embeds[b][k + 1:cut[b]]])
        seq_embeds.append(torch.cat([first, second, embeds[a][cut[a]:], embeds[b][cut[b]:]]))
        seq_labels.append(labels[a][:cut[a]] + labels[b][:k] + labels[b][k + 1:cut[b]] + labels[a][cut[a]:]
                          + labels[b][cut[b]:])
    logits = llm(inputs_embeds=torch.stack(seq_embeds)).logits
    return hf_ce(logits, seq_labels, cfg.image_token_id, mask_placeholder)


def original_log_likelihood(model, parts, mask_placeholder: bool) -> torch.Tensor:
    """get_log_likelihood_scores: text -> ids (<bos> only on the first text), image -> W_cap(CLIP) with labels
    -100, the LLM run on the concatenation, minus its loss."""
    llm, tok, k = model.language_model, model.processor.tokenizer, model.config.num_visual_tokens
    embeds, labels, bos = [], [], True
    for part in parts:
        if isinstance(part, str):
            ids = ([tok.bos_token_id] if bos else []) + tok(part, add_special_tokens=False)["input_ids"]
            bos = False
            embeds.append(llm.get_input_embeddings()(torch.tensor(ids)))
            labels += ids
        else:
            pooled = model.vision_model(pixel_values=model.processor.preprocess_images([part])).pooler_output
            embeds.append(F.linear(pooled, model.adapter.w_cap.weight, model.adapter.w_cap.bias).view(k, -1))
            labels += [-100] * k
    logits = llm(inputs_embeds=torch.cat(embeds)[None]).logits
    return -hf_ce(logits, [labels], model.config.image_token_id, mask_placeholder)


# ---------------------------------------------------------------------------------------------- tests
def set_semantics(model, values):
    for name, value in values.items():
        setattr(model.config, name, value)


@pytest.mark.parametrize("semantics", [ORIGINAL_SEMANTICS, GILL_DEFAULTS], ids=["original", "gill_hf"])
@torch.no_grad()
def test_losses_match_the_documented_semantics(make_model, semantics):
    model = resized_model(make_model).train()  # pack_prob=1: both passes pack
    set_semantics(model, semantics)
    ids, mask, pixels = batch(model)
    assert len(set(mask.sum(1).tolist())) == 4  # four different caption lengths
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, gill_objective=True)
    original = not semantics["mask_image_token_logit"]
    lp = original_lp(model, ids, mask, semantics["packed_lp_first_caption_only"], mask_placeholder=not original)
    lc = original_lc(model, ids, mask, pixels, mask_placeholder=not original)
    torch.testing.assert_close(out.img_token_loss, lp, **TOL)
    torch.testing.assert_close(out.caption_loss, lc, **TOL)


@torch.no_grad()
def test_the_two_semantics_really_differ(make_model):
    """Guard against a vacuous match: each switch alone moves its loss by far more than the 1e-6 tolerance."""
    model = resized_model(make_model).train()
    ids, mask, pixels = batch(model)

    def losses(**values):
        set_semantics(model, {**GILL_DEFAULTS, **values})
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, gill_objective=True)
        return out.caption_loss, out.img_token_loss

    lc, lp = losses()
    lc_finite, lp_finite = losses(mask_image_token_logit=False)
    _, lp_first = losses(packed_lp_first_caption_only=True)
    assert (lc_finite - lc).abs() > 1e-5 and (lp_finite - lp).abs() > 1e-5  # one more token in every softmax
    assert (lp_first - lp).abs() > 1e-3


@pytest.mark.parametrize("masked", [False, True])
@torch.no_grad()
def test_log_likelihood_is_the_originals(make_model, masked):
    model = resized_model(make_model).eval()
    model.config.mask_image_token_logit = masked
    parts = ["a picture of", Image.new("RGB", (40, 36), "red"), "a red circle on the left", "and",
             Image.new("RGB", (32, 32), "blue"), "a blue square"]
    torch.testing.assert_close(model.log_likelihood(parts), original_log_likelihood(model, parts, masked), **TOL)


def test_finite_placeholder_needs_a_row_and_is_never_generated(make_model):
    model = make_model("opt", seed=3)  # the tiny LLM has no row for <|image|> (id 512)
    model.config.mask_image_token_logit = False
    ids, mask, pixels = batch(model)
    with pytest.raises(ValueError, match=r"mask_image_token_logit=False keeps the LLM's own logit for <\|image\|> "
                                         r"\(id 512\) but the LLM scores only 512 tokens"):
        model(input_ids=ids, attention_mask=mask, pixel_values=pixels, gill_objective=True)
    model = make_model("opt", seed=3, mask_image_token_logit=False)  # from_backbones resizes, as the original
    assert model.get_input_embeddings().weight.shape[0] == len(model.processor.tokenizer)
    placeholder = model.config.image_token_id

    class PreferPlaceholder(LogitsProcessor):
        def __call__(self, input_ids, scores):
            assert torch.isfinite(scores[:, placeholder]).all()  # the model's own logit, as the original
            scores[:, placeholder] = 1e4
            return scores

    enc = model.processor(["a picture of", Image.new("RGB", (40, 36), "red")])
    out = model.generate(**enc, max_new_tokens=6, do_sample=False,
                         logits_processor=LogitsProcessorList([PreferPlaceholder()]))
    assert placeholder not in out[0, enc["input_ids"].shape[1]:].tolist()


@torch.no_grad()
def test_converter_original_semantics_reproduces_the_original(tmp_path, tiny_backbones):
    files = build_tiny_release(tmp_path / "release", tiny_backbones)
    assert cli_main(["convert-original", "--checkpoint", files["checkpoint"], "--model-args", files["model_args"],
                     "--original-semantics", "--with-processor", "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: saved[k] for k in ORIGINAL_SEMANTICS} == ORIGINAL_SEMANTICS
    model = GILLForConditionalGeneration.from_pretrained(tmp_path / "out").train()
    assert model.language_model.get_input_embeddings().weight.shape[0] == len(model.processor.tokenizer)
    model.config.pack_prob = 1.0
    ids, mask, pixels = batch(model)
    out = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, gill_objective=True)
    torch.testing.assert_close(out.img_token_loss, original_lp(model, ids, mask, True, False), **TOL)
    torch.testing.assert_close(out.caption_loss, original_lc(model, ids, mask, pixels, False), **TOL)
