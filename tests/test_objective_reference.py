"""Training objectives against direct computations: l_c / l_p with captions of different lengths, packed rows,
``hidden_layer``, MiniGPT-5 stage 2 (voken position, CFG drop, text loss), the latent-diffusion loss (timesteps,
target, Min-SNR weight), gradient accumulation with labels and the logged loss terms."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import SMALL_MAPPER
from diffusers import DDPMScheduler
from PIL import Image
from transformers import TrainerCallback

from gill_hf.training import GILLForInterleavedTraining, InterleavedDataCollator, LatentDiffusionLoss, train_gill
from gill_hf.training.trainer import minigpt5_overrides

CAPTIONS = ["a red star", "a big blue square at the top of the picture next to the tree",
            "a green ring on the left", "two small yellow circles in the corner"]
COLOURS = ["red", "blue", "green", "yellow"]
QUIET = dict(disable_tqdm=True, logging_steps=1, dataloader_num_workers=0, use_cpu=True, seed=0, report_to="none")

pytestmark = pytest.mark.usefixtures("single_thread")


def _caption_batch(caption_batch, model, n=4):
    """Captions of different lengths (so rows pad differently) through conftest's ``caption_batch``."""
    return caption_batch(model, n, texts=CAPTIONS, max_length=32)


def _unpadded(batch, i):
    return [t for t, m in zip(batch["input_ids"][i].tolist(), batch["attention_mask"][i].tolist()) if m]


def _token_nll(model, embeds, targets):
    """-log p(targets[j] | embeds[:j]) for each (position j, target) pair; the LLM run directly, one sequence."""
    out = model.language_model(inputs_embeds=embeds[None], output_hidden_states=True)
    logp = F.log_softmax(model.full_logits(out.logits, out.hidden_states[-1])[0].float(), -1)
    return [-logp[j - 1, t] for j, t in targets], out.hidden_states


# ---------------------------------------------------------------- stage 1: l_c, l_p, packing, hidden_layer
def test_captions_of_different_lengths_never_supervise_padding(make_model, caption_batch):
    model = make_model("opt").eval()
    batch = _caption_batch(caption_batch, model)
    lengths = batch["attention_mask"].sum(1)
    assert len(set(lengths.tolist())) == 4, lengths  # rows really are padded to different extents
    out = model(**batch, gill_objective=True, pack=False)
    k, img = model.config.num_visual_tokens, set(model.config.img_token_ids)
    feats = model.encode_images(batch["pixel_values"])
    embed = model.language_model.get_input_embeddings()
    cap_terms, lp_terms = [], []
    with torch.no_grad():
        for i in range(4):  # one example at a time, no padding at all
            ids = _unpadded(batch, i)
            caption = [t for t in ids if t not in img]  # "<bos> caption"
            prefix = model.adapter.w_cap(feats[i]).view(k, -1)
            terms, _ = _token_nll(model, torch.cat([prefix, embed(torch.tensor(caption))]),
                                  [(k + j, t) for j, t in enumerate(caption)])
            cap_terms += terms
            terms, _ = _token_nll(model, model.embed_tokens(torch.tensor([ids]))[0],
                                  [(j, ids[j]) for j in range(1, len(caption) + 1)])  # caption + [IMG0]
            lp_terms += terms
    torch.testing.assert_close(out.caption_loss, torch.stack(cap_terms).mean(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.img_token_loss, torch.stack(lp_terms).mean(), rtol=1e-5, atol=1e-5)


def test_packed_rows_drop_the_second_bos(make_model, caption_batch):
    model = make_model("opt").eval()
    batch = _caption_batch(caption_batch, model, n=2)
    out = model(**batch, gill_objective=True, pack=True)
    cfg, k, r = model.config, model.config.num_visual_tokens, model.config.num_img_tokens
    img, bos = set(cfg.img_token_ids), model.processor.tokenizer.bos_token_id
    a, b = _unpadded(batch, 0), _unpadded(batch, 1)
    assert a[0] == b[0] == bos
    feats = model.encode_images(batch["pixel_values"])
    embed = model.language_model.get_input_embeddings()
    with torch.no_grad():
        # text pass: "<bos> cap_a [IMG0..7] cap_b [IMG0..7]" (b's <bos> dropped); every caption token and [IMG0]
        # of both examples is a target (the first token has nothing before it)
        packed = a + b[1:]
        targets = [(j, t) for j, t in enumerate(packed) if j > 0 and (t not in img or t == cfg.img_token_ids[0])]
        terms, states = _token_nll(model, model.embed_tokens(torch.tensor([packed]))[0], targets)
        torch.testing.assert_close(out.img_token_loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)
        starts = [len(a) - r, len(packed) - r]
        want = torch.stack([states[-1][0, s:s + r] for s in starts])
        torch.testing.assert_close(out.img_hidden_states, want, rtol=1e-4, atol=1e-5)
        # captioning pass: "[v_a] <bos> cap_a [v_b] cap_b"; every caption token is a target
        cap_a, cap_b = [t for t in a if t not in img], [t for t in b[1:] if t not in img]
        prefix = model.adapter.w_cap(feats).view(2, k, -1)
        embeds = torch.cat([prefix[0], embed(torch.tensor(cap_a)), prefix[1], embed(torch.tensor(cap_b))])
        offsets = [k + j for j in range(len(cap_a))] + [2 * k + len(cap_a) + j for j in range(len(cap_b))]
        terms, _ = _token_nll(model, embeds, list(zip(offsets, cap_a + cap_b)))
        torch.testing.assert_close(out.caption_loss, torch.stack(terms).mean(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layer", [-2, 1])
def test_hidden_layer_feeds_every_head(make_model, caption_batch, layer):
    model = make_model("opt", hidden_layer=layer).eval()
    batch = _caption_batch(caption_batch, model, n=2)
    out = model(**batch, gill_objective=True, pack=False)
    r = model.config.num_img_tokens
    with torch.no_grad():
        states = []
        for i in range(2):
            ids = _unpadded(batch, i)
            hidden = model.language_model(inputs_embeds=model.embed_tokens(torch.tensor([ids])),
                                          output_hidden_states=True).hidden_states
            assert not torch.allclose(hidden[layer], hidden[-1])
            states.append(hidden[layer][0, len(ids) - r:])
        states = torch.stack(states)
        torch.testing.assert_close(out.img_hidden_states, states, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.text_embeds, states[:, 0] @ model.adapter.w_t2i.weight.T
                                   + model.adapter.w_t2i.bias, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(out.gen_embeds, model.adapter.mapper(states + model.adapter.img_embeddings),
                                   rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- stage 2
@pytest.fixture(scope="module")
def stage2_model(tiny_backbones):
    """A MiniGPT-5 stage-2 GILL (predicting voken position, CFG dropout, MLP input projection) on tiny Llama."""
    def _make(**overrides):
        torch.manual_seed(0)
        values = {**SMALL_MAPPER, **minigpt5_overrides("interleaved"), "ldm_loss_weight": 0.0,
                  "img_token_loss_weight": 1.0, "pack_prob": 0.0, **overrides}
        return GILLForInterleavedTraining.from_backbones(tiny_backbones["llama"], tiny_backbones["clip"],
                                                         tiny_backbones["sd"], **values)
    return _make


def _story(i, answer, with_image=True):
    return {"index": i, "task": "gen", "context": [f"we went to the park {i}", Image.new("RGB", (40, 40), "blue")],
            "instruction": "show the next step", "instruction_image": None, "target_text": answer,
            "output_image": Image.new("RGB", (40, 40), COLOURS[i % 4]) if with_image else None, "error": None}


STORIES = ["a red star", "then we saw a big blue square at the top of the picture next to the tree", "a green ring",
           "finally two small yellow circles"]


def _seed_dropping_some(n, p):
    """A global seed whose first ``torch.rand(n) < p`` draw drops some, not all, of n sequences."""
    for seed in range(100):
        torch.manual_seed(seed)
        if 0 < int((torch.rand(n) < p).sum()) < n:
            return seed
    raise AssertionError("no such seed")


def test_stage2_objective_equals_a_direct_computation(stage2_model):
    model = stage2_model(cfg_dropout_prob=0.5).train()
    cfg, r = model.config, model.config.num_img_tokens
    batch = InterleavedDataCollator(model.processor)([_story(i, s) for i, s in enumerate(STORIES)])
    n = len(STORIES)
    g = torch.Generator().manual_seed(1)
    targets, null = torch.randn(n, 77, cfg.gen_emb_dim, generator=g), torch.randn(77, cfg.gen_emb_dim, generator=g)
    seed = _seed_dropping_some(n, 0.5)
    torch.manual_seed(seed)
    expected_drop = torch.rand(n) < 0.5  # one uniform draw per voken sequence, in block order
    torch.manual_seed(seed)
    out = model(**batch, gill_objective=True, gen_targets=targets, null_gen_target=null)

    with torch.no_grad():
        feats = model.encode_images(batch["pixel_values"])
        embeds = model.embed_inputs(batch["input_ids"], feats)
        text_terms, voken = [], []
        for i in range(n):
            m = int(batch["attention_mask"][i].sum())
            ids, labels = batch["input_ids"][i, :m].tolist(), batch["labels"][i, :m].tolist()
            supervised = [(j, t) for j, t in enumerate(labels) if t != -100 and j > 0]
            assert [t for _, t in supervised].count(cfg.img_token_ids[0]) == 1
            assert not set(t for _, t in supervised) & set(cfg.img_token_ids[1:])
            terms, hidden = _token_nll(model, embeds[i, :m], supervised)
            text_terms += terms
            start = ids.index(cfg.img_token_ids[0])
            voken.append(hidden[-1][0, start - 1:start + r - 1])  # the states that predict [IMG0..7]
        voken = torch.stack(voken)
        torch.testing.assert_close(out.img_token_loss, torch.stack(text_terms).mean(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.img_hidden_states, voken, rtol=1e-4, atol=1e-5)
        inputs = torch.where(expected_drop[:, None, None], torch.zeros_like(voken), voken)
        mapped = model.adapter.mapper(inputs)
        torch.testing.assert_close(out.gen_embeds, mapped, rtol=1e-4, atol=1e-5)
        goal = torch.where(expected_drop[:, None, None], null.expand(n, -1, -1), targets)
        l2 = (mapped - goal).norm(dim=-1).mean()  # mean per-token L2 distance (gen_loss_type "l2")
        torch.testing.assert_close(out.gen_loss, l2, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss, out.img_token_loss + cfg.gen_loss_weight * l2, rtol=1e-5, atol=1e-6)


class _Record:
    def __init__(self, func):
        self.func, self.calls = func, []

    def __call__(self, *args, **kwargs):
        result = self.func(*args, **kwargs)
        self.calls.append((args, kwargs, result))
        return result


@pytest.mark.parametrize("prediction_type,gamma", [("epsilon", 5.0), ("v_prediction", 5.0), ("epsilon", None)])
def test_latent_diffusion_loss_equals_a_direct_computation(tiny_backbones, monkeypatch, prediction_type, gamma):
    base = LatentDiffusionLoss.from_pretrained(tiny_backbones["sd"])
    scheduler = DDPMScheduler.from_config(base.scheduler.config, prediction_type=prediction_type)
    ldm = LatentDiffusionLoss(base.unet, base.vae, scheduler, snr_gamma=gamma)
    steps = torch.tensor([0, 40, 500, 999])  # SNR far above and far below gamma
    g = torch.Generator().manual_seed(2)
    sample = torch.randn(4, 4, 16, 16, generator=g)  # what the VAE posterior draws
    noise = torch.randn(4, 4, 16, 16, generator=g)
    cond = torch.randn(4, 77, base.unet.config.cross_attention_dim, generator=g)
    drawn = []

    def randint(*args, **kwargs):
        drawn.append(args)
        return steps.clone()

    monkeypatch.setattr(ldm.vae, "encode", lambda x: SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda: sample)))
    monkeypatch.setattr(torch, "randn_like", lambda x, **kw: noise.clone())
    monkeypatch.setattr(torch, "randint", randint)
    unet = _Record(ldm.unet.forward)
    monkeypatch.setattr(ldm.unet, "forward", unet)
    loss = ldm(cond, torch.zeros(4, 3, ldm.image_size, ldm.image_size))
    monkeypatch.undo()

    assert drawn == [(0, 1000, (4,))]  # uniform over every training timestep, one per image
    (args, kwargs, result), = unet.calls
    noisy, t = args[0], args[1]
    x0 = sample * base.vae.config.scaling_factor
    alpha = scheduler.alphas_cumprod[steps].double()[:, None, None, None]
    torch.testing.assert_close(t, steps)
    torch.testing.assert_close(noisy, (alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], cond)
    target = noise if prediction_type == "epsilon" else (alpha.sqrt() * noise - (1 - alpha).sqrt() * x0).float()
    per_image = ((result.sample - target) ** 2).mean(dim=(1, 2, 3)).double()
    snr = (alpha / (1 - alpha)).flatten()
    if gamma is None:
        weight = torch.ones(4, dtype=torch.double)
    else:  # Min-SNR-gamma: min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v-prediction
        weight = snr.clamp(max=gamma) / (snr if prediction_type == "epsilon" else snr + 1)
    assert (snr[:2] > 5).all() and (snr[2:] < 5).all()
    torch.testing.assert_close(loss.double(), (weight * per_image).mean(), rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------- Trainer: accumulation, logging
class _GradCapture(TrainerCallback):
    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_stage2_accumulation_equals_the_full_batch_token_mean(stage2_model, tmp_path):
    """Answers of different lengths: 2 micro-batches of 1 accumulated == one batch of 2 == d/dθ of the token mean
    over both (transformers' ``num_items_in_batch`` semantics for labels)."""
    stories = [_story(0, STORIES[0]), _story(1, STORIES[1])]
    collator = InterleavedDataCollator(stage2_model().processor)
    counts = [int((collator([s])["labels"][0, 1:] != -100).sum()) for s in stories]
    assert counts[0] != counts[1]

    reference = stage2_model(cfg_dropout_prob=0.0).train()
    total = 0.0
    for story in stories:
        one = collator([story])
        m = int(one["attention_mask"][0].sum())
        embeds = reference.embed_inputs(one["input_ids"], reference.encode_images(one["pixel_values"]))[0, :m]
        labels = one["labels"][0, :m].tolist()
        terms, _ = _token_nll(reference, embeds, [(j, t) for j, t in enumerate(labels) if t != -100 and j > 0])
        total = total + torch.stack(terms).sum()
    (total / sum(counts)).backward()
    want = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}

    for batch_size, accumulation in ((2, 1), (1, 2)):
        capture = _GradCapture()
        trainer = train_gill(stage2_model(cfg_dropout_prob=0.0), stories, str(tmp_path / f"{batch_size}"),
                             data_collator=collator, max_steps=1, callbacks=[capture], max_grad_norm=0.0,
                             per_device_train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
                             **QUIET)
        trainer.train()
        assert capture.grads.keys() == want.keys() and len(want) >= 3
        for name in want:
            torch.testing.assert_close(capture.grads[name], want[name], rtol=1e-4, atol=1e-6,
                                       msg=f"{name} (batch {batch_size} x {accumulation})")
        (log,) = [h for h in trainer.state.log_history if "loss" in h]
        assert log["img_token_loss"] == pytest.approx(log["loss"], abs=1e-4)  # logged like the loss


def test_logged_terms_are_averaged_over_the_same_batches_as_the_loss(make_model, tmp_path):
    """Accumulation 2, logging every 2 steps: each log's ``loss`` and terms are means over the same 4 micro-batches."""
    from gill_hf.training import CaptionImageDataset
    from gill_hf.toy_world import write_toy_cc3m

    ds = CaptionImageDataset.from_tsv(write_toy_cc3m(tmp_path / "cc3m", 8))
    model = make_model("opt", pack_prob=0.5)
    outputs = []
    model.register_forward_hook(lambda module, args, out: outputs.append(out))
    trainer = train_gill(model, ds, str(tmp_path / "out"), max_steps=4, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, **{**QUIET, "logging_steps": 2})
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h]
    assert [h["step"] for h in logs] == [2, 4] and len(outputs) == 8
    terms = ("caption_loss", "img_token_loss", "ret_loss")
    for log, window in zip(logs, (outputs[:4], outputs[4:])):
        assert log["loss"] == pytest.approx(sum(o.loss.item() for o in window) / 4, abs=1e-4)
        for name in terms:
            assert log[name] == pytest.approx(sum(getattr(o, name).item() for o in window) / 4, abs=2e-6), name
        assert log["loss"] == pytest.approx(sum(log[name] for name in terms), abs=2e-4)  # weights 1, no l_g
