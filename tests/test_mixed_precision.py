"""bf16 / fp16 autocast on every training path (stage 1, stage 2 LoRA + LDM loss, decision head) with fp32 and bf16
backbones; trainables stay fp32 masters; a bf16-autocast step's losses match the fp32 step within tolerance.

accelerate 1.15 runs ``bf16=True`` as bfloat16 autocast on CPU, but ``fp16=True`` on CPU only in fp32 (its fp16
autocast + GradScaler are for accelerators). So the fp16 autocast step with a GradScaler over fp32 masters (what the
Trainer does on CUDA) is run here directly with torch's CPU autocast and ``torch.amp.GradScaler("cpu")``."""

import pytest
import torch
from conftest import SMALL_MAPPER
from test_loading_switches import objective
from test_training import QUIET, toy_pairs_with_targets

from gill_hf import GILLForConditionalGeneration
from gill_hf.training import (GILLForInterleavedTraining, InterleavedDataCollator, LatentDiffusionLoss,
                              VISTTaskDataset, apply_lora, train_gill)
from gill_hf.training.lora import lora_parameters
from gill_hf.toy_world import write_toy_vist

# bf16 keeps 8 mantissa bits (relative step 2^-8 = 0.4%); through two 2-layer LLM passes, CLIP and the mapper the
# per-term losses of one batch stay within 2% of the fp32 values (measured: < 0.5%).
BF16_LOSS_RTOL = 2e-2


@pytest.fixture(scope="module")
def toy_pairs(tmp_path_factory, tiny_backbones):
    return toy_pairs_with_targets(tmp_path_factory.mktemp("pairs"), 8, tiny_backbones["sd"])


def build(tiny_backbones, dtype=None, llm="opt", **overrides):
    torch.manual_seed(0)
    return GILLForConditionalGeneration.from_backbones(tiny_backbones[llm], tiny_backbones["clip"],
                                                       tiny_backbones["sd"], dtype=dtype,
                                                       **{**SMALL_MAPPER, **overrides})


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("backbone_dtype", [torch.float32, torch.bfloat16])
def test_stage1_autocast_trains_with_fp32_masters(tiny_backbones, toy_pairs, tmp_path, precision, backbone_dtype):
    ds, store = toy_pairs
    model = build(tiny_backbones, backbone_dtype, pack_prob=0.5)
    before = {n: p.detach().clone() for n, p in model.adapter.named_parameters()}
    trainer = train_gill(model, ds, str(tmp_path), targets=store, max_steps=2, **{precision: True}, **QUIET)
    assert trainer.accelerator.mixed_precision == precision
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2
    for key in ("loss", "caption_loss", "img_token_loss", "gen_loss", "ret_loss"):
        assert all(torch.isfinite(torch.tensor(h[key])) for h in logs), key
    assert model.language_model.dtype == model.vision_model.dtype == backbone_dtype
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert not torch.equal(before["w_cap.weight"], model.adapter.w_cap.weight)


def test_bf16_autocast_losses_match_fp32(tiny_backbones, caption_batch):
    model = build(tiny_backbones).eval()
    batch = caption_batch(model)
    with torch.no_grad():
        fp32 = objective(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = objective(model, batch)
    for name in ("loss", "caption_loss", "img_token_loss", "gen_loss", "ret_loss"):
        assert bf16[name].dtype == torch.float32, name  # loss terms are reduced in fp32
        torch.testing.assert_close(bf16[name], fp32[name], rtol=BF16_LOSS_RTOL, atol=0, msg=name)
    assert not torch.equal(bf16.loss, fp32.loss)  # autocast really ran in bf16


def test_fp16_autocast_step_with_grad_scaler(tiny_backbones, caption_batch):
    """What accelerate does for fp16=True on a GPU: fp16 autocast forward, scaled backward, unscale + step (fp32
    backbones; CPU autocast cannot run bf16-weight LayerNorms on fp16 activations, CUDA's casts them to fp32)."""
    model = build(tiny_backbones, torch.float32, pack_prob=0.0)
    from gill_hf.training import configure_trainable

    configure_trainable(model)
    model.train()
    batch = caption_batch(model)
    with torch.no_grad():
        reference = objective(model.eval(), batch).loss
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    before = model.adapter.w_cap.weight.detach().clone()
    with torch.autocast("cpu", dtype=torch.float16):
        out = objective(model, batch)
    scaler.scale(out.loss).backward()
    scaler.unscale_(optimizer)  # raises "Attempting to unscale FP16 gradients" unless the masters are fp32
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in params)
    scaler.step(optimizer)
    scaler.update()
    assert scaler.get_scale() == 2.0 ** 10  # no overflow, so the step was taken
    assert not torch.equal(before, model.adapter.w_cap.weight)
    assert all(p.dtype == torch.float32 for p in params)
    torch.testing.assert_close(out.loss, reference, rtol=BF16_LOSS_RTOL, atol=0)


def test_stage2_lora_ldm_under_bf16(tiny_backbones, tmp_path):
    from gill_hf.training import minigpt5_overrides

    overrides = {**minigpt5_overrides("interleaved"), "img_token_loss_weight": 1.0, "pack_prob": 0.0}
    build(tiny_backbones, llm="llama", **overrides).save_pretrained(tmp_path / "stage1")
    model = GILLForInterleavedTraining.from_pretrained(tmp_path / "stage1").train()
    apply_lora(model)
    ds = VISTTaskDataset.from_json(write_toy_vist(tmp_path / "vist", num_stories=2, steps=2), tasks=("gen",))
    ldm = LatentDiffusionLoss.from_pretrained(tiny_backbones["sd"], snr_gamma=model.config.ldm_snr_gamma)
    collator = InterleavedDataCollator(model.processor, ldm_image_size=ldm.image_size)
    trainer = train_gill(model, ds, str(tmp_path / "out"), data_collator=collator, ldm_loss=ldm, max_steps=2,
                         bf16=True, **QUIET)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor([h["loss"], h["ldm_loss"]])).all() for h in logs)
    lora = lora_parameters(model)
    assert lora and all(p.dtype == torch.float32 for p in lora.values())
    assert all(p.abs().sum() > 0 for n, p in lora.items() if "lora_B" in n)  # B starts at 0: it trained


def test_decision_head_under_autocast_with_bf16_model(tiny_backbones, tmp_path):
    from gill_hf.training.decision_training import prompt_features, train_decision_head

    build(tiny_backbones).save_pretrained(tmp_path)
    model = GILLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    head = model.adapter.decision_head
    assert head[1].weight.dtype == torch.bfloat16
    prompts = ["a photo of a dog", "a red circle", "an astronaut riding a horse on mars", "the eiffel tower"] * 2
    labels = torch.tensor([1, 0, 0, 1] * 2)
    def eval_loss():  # without the head's dropout
        with torch.no_grad():
            return torch.nn.functional.cross_entropy(head.eval()(features.to(head[1].weight)).float(), labels)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        features = prompt_features(model, prompts, batch_size=4)
        start = eval_loss()
        losses = train_decision_head(head, features, labels, steps=60, lr=1e-2)
        end = eval_loss()
    assert all(torch.isfinite(torch.tensor(losses))) and end < start
    assert head[1].weight.dtype == torch.bfloat16 and not head[1].weight.requires_grad  # back as it was
