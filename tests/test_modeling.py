import math

import pytest
import torch
import torch.nn.functional as F

from gill_hf.losses import contrastive_loss, generation_loss
from gill_hf.packing import pack_pairs

LLMS = ["opt", "llama"]


@pytest.mark.parametrize("llm", LLMS)
def test_every_tensor_has_the_paper_shape(make_model, caption_batch, llm):
    model = make_model(llm)
    cfg, n = model.config, 4
    e, f, d = cfg.llm_embed_dim, cfg.llm_feature_dim, cfg.vision_dim
    a = model.adapter
    assert a.w_cap.weight.shape == (cfg.num_visual_tokens * e, d)
    assert a.img_embeddings.shape == (cfg.num_img_tokens, e)
    assert (a.img_output_embeddings is None) == (llm == "opt")  # OPT ties, Llama has its own output rows
    assert a.w_t2i.weight.shape == (cfg.ret_emb_dim, f) and a.w_i2t.weight.shape == (cfg.ret_emb_dim, d)
    assert a.logit_scale.shape == () and a.decision_head[1].weight.shape == (2, f)
    assert a.mapper.queries.shape == (1, cfg.num_gen_queries, cfg.mapper_hidden_dim)
    out = model(**caption_batch(model, n), gill_objective=True, pack=False)
    assert out.img_hidden_states.shape == (n, cfg.num_img_tokens, f)
    assert out.text_embeds.shape == out.image_embeds.shape == (n, cfg.ret_emb_dim)
    assert out.gen_embeds.shape == (n, cfg.num_gen_queries, cfg.gen_emb_dim)
    assert list(out.keys())[0] == "loss" and out[0] is out.loss
    for name in ("loss", "caption_loss", "img_token_loss", "gen_loss", "ret_loss"):
        assert out[name].shape == () and torch.isfinite(out[name])
    total = (cfg.caption_loss_weight * out.caption_loss + cfg.img_token_loss_weight * out.img_token_loss
             + cfg.gen_loss_weight * out.gen_loss + cfg.ret_loss_weight * out.ret_loss)
    torch.testing.assert_close(out.loss, total)


@pytest.mark.parametrize("llm", LLMS)
def test_gradients_reach_only_the_adapter_and_backbones_stay_bit_identical(make_model, caption_batch, llm):
    model = make_model(llm).train()
    batch = caption_batch(model)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("adapter.")}
    trainable = [p for p in model.parameters() if p.requires_grad]
    in_eq5 = lambda name: name.startswith("adapter.") and ".decision_head." not in name  # noqa: E731
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                           if in_eq5(n)}
    optim = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for _ in range(3):
        optim.zero_grad()
        model(**batch, gill_objective=True).loss.backward()
        for name, p in model.named_parameters():
            assert (p.grad is not None) == in_eq5(name), name
        optim.step()
        model.renormalize_img_embeddings()
    assert not model.language_model.training and not model.vision_model.training
    for key, value in model.state_dict().items():
        if not key.startswith("adapter."):
            assert torch.equal(value, frozen[key]), key
    assert sum(p.numel() for p in optim.param_groups[0]["params"]) == sum(
        v.numel() for k, v in model.adapter_state_dict().items() if in_eq5(k))


@pytest.mark.parametrize("llm", LLMS)
def test_each_loss_falls_on_a_fixed_batch(make_model, caption_batch, llm):
    # l_p as in Eq. 2 (only [IMG0] supervised): the caption tokens of the original's l_p have no trainable path.
    model = make_model(llm, lp_supervise_caption=False).train()
    batch = caption_batch(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=1e-2)
    history = []
    for _ in range(40):  # the original's step: clip to 1.0, then renormalise the [IMG] rows
        out = model(**batch, gill_objective=True, pack=False)
        history.append({k: out[k].item() for k in ("caption_loss", "img_token_loss", "gen_loss", "ret_loss")})
        optim.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optim.step()
        model.renormalize_img_embeddings()
    # A 2-layer random LLM reads the k prefix vectors weakly (l_c falls a little) and the renorm caps the [IMG0]
    # logit norm of the tiny vocabulary (l_p falls moderately); l_g and l_r have no such limit.
    required_fall = {"caption_loss": 0.96, "img_token_loss": 0.93, "gen_loss": 0.8, "ret_loss": 0.5}
    for name in history[0]:
        first, last = history[0][name], history[-1][name]
        print(f"{llm} {name}: {first:.3f} -> {last:.3f}")
        assert last < required_fall[name] * first, f"{name} went {first:.3f} -> {last:.3f}"


@pytest.mark.parametrize("llm", LLMS)
def test_losses_equal_a_brute_force_computation(make_model, caption_batch, llm):
    model = make_model(llm).eval()
    batch = caption_batch(model, n=3)
    out = model(**batch, gill_objective=True, pack=False)
    cfg, lm = model.config, model.language_model
    img_ids = set(cfg.img_token_ids)
    cap_losses, lp_terms, states = [], [], []
    feats = model.encode_images(batch["pixel_values"])
    for i in range(3):  # one example at a time, no padding, straight from the definitions
        ids = [t for t, m in zip(batch["input_ids"][i].tolist(), batch["attention_mask"][i].tolist()) if m]
        caption = [t for t in ids if t not in img_ids]
        # l_c: k visual vectors, then "<bos> caption"; every caption token (and bos) is a target.
        prefix = model.adapter.w_cap(feats[i]).view(cfg.num_visual_tokens, -1)
        emb = torch.cat([prefix, lm.get_input_embeddings()(torch.tensor(caption))])[None]
        o = lm(inputs_embeds=emb, output_hidden_states=True)
        logits = model.full_logits(o.logits, o.hidden_states[-1])[0]
        k = cfg.num_visual_tokens
        cap_losses += [-F.log_softmax(logits[k - 1 + j], -1)[t] for j, t in enumerate(caption)]
        # l_p on "<bos> caption [IMG0..7]": caption tokens after bos and [IMG0] are targets.
        emb = model.embed_tokens(torch.tensor([ids]))
        o = lm(inputs_embeds=emb, output_hidden_states=True)
        logits = model.full_logits(o.logits, o.hidden_states[-1])[0]
        lp_terms += [-F.log_softmax(logits[j - 1], -1)[ids[j]] for j in range(1, len(caption) + 1)]
        states.append(o.hidden_states[-1][0, len(caption):])
    torch.testing.assert_close(out.caption_loss, torch.stack(cap_losses).mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out.img_token_loss, torch.stack(lp_terms).mean(), rtol=1e-4, atol=1e-4)
    states = torch.stack(states)
    torch.testing.assert_close(out.img_hidden_states, states, rtol=1e-4, atol=1e-5)
    mapped = model.adapter.mapper(states + model.adapter.img_embeddings)
    l2 = torch.stack([(mapped[i, t] - batch["gen_targets"][i, t]).norm() for i in range(3) for t in range(77)])
    torch.testing.assert_close(out.gen_loss, l2.mean(), rtol=1e-4, atol=1e-4)
    t = F.normalize(model.adapter.w_t2i(states[:, 0]), dim=-1)
    v = F.normalize(model.adapter.w_i2t(feats), dim=-1)
    scale = model.adapter.logit_scale.exp()
    nce = sum(-torch.log_softmax(scale * v @ t.T, 1)[i, i] - torch.log_softmax(scale * t @ v.T, 1)[i, i]
              for i in range(3)) / 6
    torch.testing.assert_close(out.ret_loss, nce, rtol=1e-4, atol=1e-4)


def test_one_text_pass_feeds_both_heads_and_clip_runs_once(make_model, caption_batch):
    model = make_model("opt").train()
    calls = {"llm": 0, "clip": 0}
    model.language_model.register_forward_hook(lambda *_: calls.__setitem__("llm", calls["llm"] + 1))
    model.vision_model.register_forward_hook(lambda *_: calls.__setitem__("clip", calls["clip"] + 1))
    model(**caption_batch(model), gill_objective=True)
    assert calls == {"llm": 2, "clip": 1}  # the original: 3 LLM passes and 2 CLIP passes per step


@pytest.mark.parametrize("llm", LLMS)
def test_lm_head_reads_the_last_hidden_state_and_img_logits_use_img_rows(make_model, llm):
    model = make_model(llm)
    ids = model.processor(["a red circle [IMG0] here"])["input_ids"]
    ids = torch.cat([ids, torch.tensor([model.config.img_token_ids])], 1)
    logits, _, raw = model.run_language_model(model.embed_tokens(ids), torch.ones_like(ids))
    final = raw.hidden_states[-1]
    head = model.language_model.get_output_embeddings().weight
    torch.testing.assert_close(raw.logits, final @ head.T, rtol=1e-4, atol=1e-5)
    img_rows = model.adapter.img_embeddings if llm == "opt" else model.adapter.img_output_embeddings
    torch.testing.assert_close(logits[..., model.config.img_token_ids], final @ img_rows.T, rtol=1e-4, atol=1e-5)
    assert torch.isneginf(logits[..., model.config.image_token_id]).all()
    normal = [i for i in range(raw.logits.shape[-1]) if i not in model.config.img_token_ids]
    assert torch.equal(logits[..., normal], raw.logits[..., normal])
    # The user's literal "[IMG0]" is plain text: exactly one [IMG] block (the one we appended) is found.
    rows, cols = model.img_block_positions(ids)
    assert rows.shape == (1, 8) and cols[0, 0] == ids.shape[1] - 8


def test_pack_pairs_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 6):
        lengths = torch.randint(2, 9, (n,), generator=g)
        ids = torch.full((n, 9), -1)
        for i in range(n):
            ids[i, :lengths[i]] = torch.randint(0, 50, (int(lengths[i]),), generator=g)
        for drop in (None, 0, 1):
            packed, plen = pack_pairs(ids, lengths, pad_id=-1, drop_in_second=drop)
            for row in range(math.ceil(n / 2)):
                a = ids[2 * row, :lengths[2 * row]].tolist()
                b = ids[2 * row + 1, :lengths[2 * row + 1]].tolist() if 2 * row + 1 < n else []
                if drop is not None and len(b) > drop:
                    b = b[:drop] + b[drop + 1:]
                expected = a + b
                assert plen[row] == len(expected)
                assert packed[row, :len(expected)].tolist() == expected
                assert (packed[row, len(expected):] == -1).all()


def test_packing_keeps_the_first_example_and_conditions_the_second(make_model, caption_batch):
    model = make_model("opt").eval()
    batch = caption_batch(model, n=4)
    plain, packed = model(**batch, gill_objective=True, pack=False), model(**batch, gill_objective=True, pack=True)
    torch.testing.assert_close(packed.img_hidden_states[0::2], plain.img_hidden_states[0::2], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(packed.img_hidden_states[1::2], plain.img_hidden_states[1::2], atol=1e-3)
    torch.testing.assert_close(packed.image_embeds, plain.image_embeds)  # images are never packed


def test_mapper_position_and_cfg_switches(make_model, caption_batch):
    model = make_model("opt", voken_feature_position="predicting", mapper_add_input_embeddings=False).eval()
    batch = caption_batch(model, n=2)
    out = model(**batch, gill_objective=True, pack=False)
    ids = batch["input_ids"]
    rows, cols = model.img_block_positions(ids)
    _, feats, _ = model.run_language_model(model.embed_tokens(ids), batch["attention_mask"])
    torch.testing.assert_close(out.gen_embeds, model.adapter.mapper(feats[rows, cols - 1]), rtol=1e-4, atol=1e-5)

    cfg_model = make_model("opt", cfg_dropout_prob=1.0).train()
    null = torch.randn(77, cfg_model.config.gen_emb_dim)
    out = cfg_model(**caption_batch(cfg_model, n=2), gill_objective=True, null_gen_target=null, pack=False)
    null_embed = cfg_model.adapter.mapper(torch.zeros(1, 8, cfg_model.config.llm_feature_dim))
    torch.testing.assert_close(out.gen_embeds, null_embed.expand(2, -1, -1), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(cfg_model.mapped_null_embedding(), null_embed)
    torch.testing.assert_close(out.gen_loss, generation_loss(null_embed.expand(2, -1, -1), null.expand(2, -1, -1)))
    with pytest.raises(ValueError, match="null_gen_target"):
        cfg_model(**caption_batch(cfg_model, n=2), gill_objective=True)


def test_bad_inputs_raise_clear_errors(make_model, caption_batch):
    model = make_model("opt")
    batch = caption_batch(model, n=2)
    with pytest.raises(ValueError, match="gen_targets have shape"):
        model(**{**batch, "gen_targets": torch.randn(2, 77, 31)}, gill_objective=True)
    with pytest.raises(ValueError, match="2 captions but 3 images"):
        model(**{**batch, "pixel_values": torch.cat([batch["pixel_values"]] * 2)[:3]}, gill_objective=True)
    enc = model.processor(["one", batch_image(), "two"])
    with pytest.raises(ValueError, match="4 image placeholder tokens .* but 0 images"):
        model.embed_inputs(enc["input_ids"])
    no_img = model.processor.tokenizer(["a caption without image tokens"], return_tensors="pt")
    with pytest.raises(ValueError, match="every caption needs exactly one"):
        model(no_img["input_ids"], attention_mask=no_img["attention_mask"], gill_objective=True)


def batch_image():
    from PIL import Image

    return Image.new("RGB", (20, 20), "red")


@pytest.mark.parametrize("llm", LLMS)
def test_img_rows_renormalise_to_the_mean_frozen_norm(make_model, llm):
    model = make_model(llm)
    with torch.no_grad():
        model.adapter.img_embeddings.mul_(torch.arange(1, 9).float()[:, None])
    model.renormalize_img_embeddings()
    target = model.language_model.get_input_embeddings().weight.norm(dim=1).mean()
    torch.testing.assert_close(model.adapter.img_embeddings.norm(dim=1), target.expand(8), rtol=1e-5, atol=1e-6)
    if llm == "llama":
        out_target = model.language_model.get_output_embeddings().weight.norm(dim=1).mean()
        torch.testing.assert_close(model.adapter.img_output_embeddings.norm(dim=1), out_target.expand(8),
                                   rtol=1e-5, atol=1e-6)


def test_contrastive_loss_is_symmetric_and_minimal_for_matched_pairs():
    x = torch.randn(5, 16)
    assert contrastive_loss(x, x, torch.tensor(math.log(100.0))) < 0.01
    y = torch.randn(5, 16)
    torch.testing.assert_close(contrastive_loss(x, y, torch.tensor(2.0)), contrastive_loss(y, x, torch.tensor(2.0)))
    pred, target = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    torch.testing.assert_close(generation_loss(pred, target, "mse"), F.mse_loss(pred, target))
