"""The Trainer recipe end to end on tiny backbones and generated toy data."""

import os

import pytest
import safetensors.torch
import torch
import yaml
from torch.utils.data import ConcatDataset
from transformers import TrainerCallback

from gill_hf import GILLForConditionalGeneration
from gill_hf.training import (CaptionImageDataset, GILLDataCollator, GILLForInterleavedTraining,
                              InterleavedDataCollator, LatentDiffusionLoss, StopAtStepCallback, TargetStore,
                              VISTTaskDataset, apply_lora, parameter_groups, precompute_targets, train_gill)
from gill_hf.training.lora import lora_parameters
from gill_hf.training.targets import DiffusionTextEncoder
from gill_hf.toy_world import write_toy_cc3m, write_toy_vist

QUIET = dict(disable_tqdm=True, logging_steps=1, per_device_train_batch_size=4, dataloader_num_workers=0,
             use_cpu=True, seed=0)


def toy_pairs_with_targets(root, n: int, sd_path: str):
    """n toy pairs as a TSV under ``root`` + their target store (the tiny SD text encoder at ``sd_path``)."""
    ds = CaptionImageDataset.from_tsv(write_toy_cc3m(root, n))
    store = TargetStore(precompute_targets(ds.captions, root / "targets", DiffusionTextEncoder(sd_path),
                                           batch_size=n, dtype="float32", progress=False))
    return ds, store


@pytest.fixture(scope="module")
def toy_cc3m(tmp_path_factory, tiny_backbones):
    return toy_pairs_with_targets(tmp_path_factory.mktemp("cc3m"), 12, tiny_backbones["sd"])


def loss_history(trainer, key):
    return [h[key] for h in trainer.state.log_history if key in h and "train_runtime" not in h]


def test_stage1_lowers_every_loss(make_model, toy_cc3m, tmp_path):
    ds, store = toy_cc3m
    model = make_model(pack_prob=0.5)
    trainer = train_gill(model, ds, str(tmp_path), targets=store, max_steps=24, learning_rate=2e-3, **QUIET)
    trainer.train()
    for key in ("caption_loss", "img_token_loss", "gen_loss", "ret_loss", "loss"):
        values = loss_history(trainer, key)
        assert len(values) == 24
        first, last = sum(values[:4]) / 4, sum(values[-4:]) / 4
        assert last < first, f"{key} did not fall: {first:.4f} -> {last:.4f}"
    rows = model.adapter.img_embeddings.norm(dim=1)  # the renorm callback ran after the last step
    torch.testing.assert_close(rows, torch.full_like(rows, model._mean_frozen_row_norm("input")))


def test_resume_matches_uninterrupted_run(make_model, toy_cc3m, tmp_path):
    ds, store = toy_cc3m
    args = dict(targets=store, max_steps=6, learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear", **QUIET)
    full = make_model(pack_prob=0.5, cfg_dropout_prob=0.3)
    train_gill(full, ds, str(tmp_path / "full"), **args).train()

    first = make_model(pack_prob=0.5, cfg_dropout_prob=0.3)
    train_gill(first, ds, str(tmp_path / "cut"), save_strategy="steps", save_steps=3,
               callbacks=[StopAtStepCallback(3)], **args).train()
    ckpt = tmp_path / "cut" / "checkpoint-3"
    saved = safetensors.torch.load_file(ckpt / "model.safetensors")
    assert saved and all(k.startswith("adapter.") for k in saved)  # trainable weights only, no backbone
    assert (ckpt / "optimizer.pt").exists() and (ckpt / "rng_state.pth").exists()

    resumed = make_model(seed=1, pack_prob=0.5, cfg_dropout_prob=0.3)  # other init: everything comes from ckpt
    train_gill(resumed, ds, str(tmp_path / "cut"), **args).train(resume_from_checkpoint=str(ckpt))
    want, got = full.adapter_state_dict(), resumed.adapter_state_dict()
    assert not torch.equal(want["adapter.w_cap.weight"], first.adapter_state_dict()["adapter.w_cap.weight"])
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def _seeded_ldm(model, ldm, batch, seed=0):
    """LDM loss of ``batch`` with fixed noise and timesteps (eval mode: no CFG dropout)."""
    model.eval()
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "ldm_pixel_values"}
        out = model(**inputs, gill_objective=True)
        torch.manual_seed(seed)
        value = ldm(out.gen_embeds, batch["ldm_pixel_values"]).item()
    model.train()
    return value, out


def test_stage2_lora_ldm_training_save_load(make_model, tiny_backbones, tmp_path):
    from gill_hf.training import minigpt5_overrides

    overrides = {**minigpt5_overrides("interleaved"), "img_token_loss_weight": 1.0, "pack_prob": 0.0}
    make_model(llm="llama", **overrides).save_pretrained(tmp_path / "stage1")
    model = GILLForInterleavedTraining.from_pretrained(tmp_path / "stage1").train()
    apply_lora(model)
    assert model.config.use_lora and len(lora_parameters(model)) == 2 * 2 * 2  # 2 layers x q,v x A,B
    ds = VISTTaskDataset.from_json(write_toy_vist(tmp_path / "vist", num_stories=3, steps=3))
    ldm = LatentDiffusionLoss.from_pretrained(tiny_backbones["sd"], snr_gamma=model.config.ldm_snr_gamma)
    collator = InterleavedDataCollator(model.processor, ldm_image_size=ldm.image_size)
    fixed = collator([ds[i] for i in range(len(ds)) if ds.examples[i][2] != "text"][:6])
    ldm_before, out_before = _seeded_ldm(model, ldm, fixed)

    trainer = train_gill(model, ds, str(tmp_path / "out"), data_collator=collator, ldm_loss=ldm, max_steps=16,
                         learning_rate=3e-3, **QUIET)
    trainer.train()
    text = loss_history(trainer, "img_token_loss")
    assert len(loss_history(trainer, "ldm_loss")) >= 12  # batches of "text" tasks only have no LDM term
    assert sum(text[-4:]) < sum(text[:4])
    ldm_after, out_after = _seeded_ldm(model, ldm, fixed)
    assert ldm_after < ldm_before and out_after.img_token_loss < out_before.img_token_loss
    assert all(p.abs().sum() > 0 for n, p in lora_parameters(model).items() if "lora_B" in n)  # B starts at 0
    assert not model.adapter.w_t2i.weight.requires_grad and not model.adapter.mapper.queries.requires_grad

    model.save_pretrained(tmp_path / "stage2")
    assert (tmp_path / "stage2" / "lora" / "adapter_config.json").exists()
    keys = safetensors.torch.load_file(tmp_path / "stage2" / "model.safetensors")
    assert all(k.startswith("adapter.") for k in keys)
    loaded = GILLForConditionalGeneration.from_pretrained(tmp_path / "stage2")
    model.eval()
    embeds = model.embed_inputs(fixed["input_ids"], model.encode_images(fixed["pixel_values"]))
    with torch.no_grad():
        want = model.run_language_model(embeds, fixed["attention_mask"])[0]
        got = loaded.run_language_model(embeds, fixed["attention_mask"])[0]
        with loaded.language_model.disable_adapter():
            without = loaded.run_language_model(embeds, fixed["attention_mask"])[0]
    torch.testing.assert_close(got, want)
    finite = torch.isfinite(got)  # the placeholder id scores -inf
    assert (got - without)[finite].abs().max() > 1e-3  # the LoRA adapter changes the outputs


def test_cfg_null_path_probability(make_model, toy_cc3m):
    ds, store = toy_cc3m
    from gill_hf.training import GILLDataCollator

    model = make_model(cfg_dropout_prob=0.25, pack_prob=0.0).train()
    batch = GILLDataCollator(model.processor, max_length=16, targets=store)([ds[i] for i in range(12)])
    null = model.mapped_null_embedding()[0]
    torch.manual_seed(0)
    dropped = 0
    with torch.no_grad():
        for _ in range(25):
            out = model(**batch, gill_objective=True)
            is_null = (out.gen_embeds - null).flatten(1).abs().amax(1) < 1e-5  # (12,)
            dropped += int(is_null.sum())
            expect = torch.where(is_null[:, None, None], batch["null_gen_target"], batch["gen_targets"])
            torch.testing.assert_close(out.gen_loss, (out.gen_embeds - expect).pow(2).sum(-1).sqrt().mean())
    assert 0.15 < dropped / 300 < 0.35  # 300 draws at p=0.25: +-4 standard deviations
    model.eval()
    with torch.no_grad():
        assert not ((model(**batch, gill_objective=True).gen_embeds - null).flatten(1).abs().amax(1) < 1e-5).any()  # no dropout in eval


def test_parameter_groups_skip_decay_where_due(make_model):
    model = make_model(llm="llama")
    groups = parameter_groups(model, weight_decay=0.1, mapper_lr_mult=10.0, learning_rate=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name in ("adapter.logit_scale", "adapter.img_embeddings", "adapter.img_output_embeddings",
                 "adapter.mapper.queries", "adapter.w_cap.bias"):
        assert name in no_decay
    assert "adapter.w_cap.weight" in decay and not any("language_model" in n for n in decay | no_decay)
    assert any(n.endswith("norm1.weight") for n in no_decay)
    assert {g.get("lr") for g in groups if any(".mapper." in names[id(p)] for p in g["params"])} == {1e-2}
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_activation_checkpointing_keeps_gradients(make_model, caption_batch):
    grads = []
    for checkpointed in (False, True):
        model = make_model(pack_prob=0.0).train()
        if checkpointed:
            assert model.activation_checkpointing_enable() == 2
        model(**caption_batch(model, 4), gill_objective=True).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_cli_train_from_yaml(tiny_backbones, tmp_path):
    from gill_hf.cli import main

    tsv = write_toy_cc3m(tmp_path / "data", 8)
    config = {"model": {"text_model": tiny_backbones["opt"], "vision_model": tiny_backbones["clip"],
                        "diffusion_model": tiny_backbones["sd"],
                        "config": {"mapper_hidden_dim": 32, "mapper_ffn_dim": 64, "mapper_encoder_layers": 1,
                                   "mapper_decoder_layers": 1}},
              "data": {"tsv": tsv, "max_length": 16},
              "training": {"output_dir": str(tmp_path / "run"), "per_device_train_batch_size": 4,
                           "disable_tqdm": True, "use_cpu": True}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "training.max_steps=2"]) == 0
    trained = GILLForConditionalGeneration.from_pretrained(tmp_path / "run")
    assert trained.config.mapper_encoder_layers == 1 and os.path.exists(tmp_path / "run" / "model.safetensors")
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "training.output_dir=null"]) == 2  # usage error


RELEASE = "/work/shared/data/gill-release/"


def test_partiprompts_labels_and_table6_baselines():
    import numpy as np

    from gill_hf.training.decision_training import (baseline_f1, macro_f1, read_partiprompts,
                                                    threshold_sweep)

    from_votes = read_partiprompts(RELEASE + "PartiPromptsAllDecisions_Alignment.tsv")
    assert from_votes == read_partiprompts(RELEASE + "PartiPromptsDecisionsConfident.tsv")  # rule reproduces it
    assert len(from_votes) == 911
    y_val = np.array([int(label == "ret") for _, label in from_votes[600:]])
    assert (y_val == 0).sum() == 201 and (y_val == 1).sum() == 110  # the paper's validation split
    base = baseline_f1(y_val)
    assert base["always_retrieve"] == pytest.approx((2 * 110 / (311 + 110)) / 2)  # paper: 0.267
    assert base["always_generate"] == pytest.approx((2 * 201 / (311 + 201)) / 2)  # paper: 0.389
    assert 0.47 < base["random"] < 0.52  # analytic expectation ~0.50 (paper's single draw: 0.451)
    assert macro_f1(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 0])) == pytest.approx((0.8 + 2 / 3) / 2)
    sweep = threshold_sweep(np.array([0.1, 0.2, 0.7, 0.9]), np.array([0, 0, 1, 1]))
    assert sweep[0.5] == 1.0 and sweep[0.05] == pytest.approx((0 + 2 * 2 / 6) / 2)


def test_fit_decision_head_on_partiprompts(make_model):
    from gill_hf.training.decision_training import fit_decision_model

    model = make_model().eval()
    before = model.adapter.decision_head[1].weight.clone()
    report = fit_decision_model(model, RELEASE + "PartiPromptsDecisionsConfident.tsv", steps=60, lr=1e-2)
    assert report["val_counts"] == {"gen": 201, "ret": 110} and report["num_val"] == 311
    assert report["losses"][-1] < report["losses"][0]
    assert model.config.decision_threshold == report["best_threshold"]
    assert report["sweep"][report["best_threshold"]] >= report["f1_at_0.5"] - 1e-9
    assert not torch.equal(before, model.adapter.decision_head[1].weight)
    assert not any(p.requires_grad for p in model.adapter.decision_head.parameters())


class GradCapture(TrainerCallback):
    """Copies every gradient just before the first optimizer step (after accumulation and clipping)."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_accumulation_matches_the_full_batch(make_model, toy_cc3m, tmp_path):
    """4 examples in one batch == 2 x 2 accumulated (per-batch means, equal token counts; InfoNCE is not
    decomposable over micro-batches, so l_r is off here)."""
    ds, store = toy_cc3m
    grads, norms = [], []
    for batch, accum in ((4, 1), (2, 2)):
        capture = GradCapture()
        trainer = train_gill(make_model(pack_prob=0.0, ret_loss_weight=0.0), ds, str(tmp_path / f"{batch}"),
                             targets=store, max_steps=1, callbacks=[capture],
                             **{**QUIET, "per_device_train_batch_size": batch, "gradient_accumulation_steps": accum})
        trainer.train()
        grads.append(capture.grads)
        norms.append(loss_history(trainer, "grad_norm")[0])
    assert norms[1] == pytest.approx(norms[0], rel=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for key in grads[0]:
        torch.testing.assert_close(grads[1][key], grads[0][key], rtol=1e-4, atol=1e-6, msg=key)


def test_bf16_backbones_with_fp32_master_weights(tiny_backbones, toy_cc3m, tmp_path):
    from conftest import SMALL_MAPPER

    ds, store = toy_cc3m
    torch.manual_seed(0)
    model = GILLForConditionalGeneration.from_backbones(tiny_backbones["opt"], tiny_backbones["clip"],
                                                        tiny_backbones["sd"], dtype=torch.bfloat16, **SMALL_MAPPER)
    trainer = train_gill(model, ds, str(tmp_path), targets=store, max_steps=3, bf16=True, **QUIET)
    trainer.train()
    assert model.language_model.dtype == torch.bfloat16 and model.vision_model.dtype == torch.bfloat16
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # master weights stay fp32
    assert all(torch.isfinite(torch.tensor(loss_history(trainer, "loss"))))


# ---------------------------------------------------------------------------------------------- standard switches
def _layer_calls(model):
    """Counts decoder-layer body runs (forward and, under checkpointing, the recompute in backward)."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    calls = {"n": 0}
    layers = [m for m in model.language_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        next(iter(layer.children())).register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    return calls, len(layers)


@pytest.mark.parametrize("switch", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_standard_checkpointing_switch_recomputes_frozen_layers(make_model, caption_batch, switch):
    from test_loading_switches import objective

    grads, recomputed = [], []
    for checkpointed in (False, True):
        model = make_model(pack_prob=0.0).train()
        if checkpointed:
            assert getattr(model, switch)() == 2 and model.is_activation_checkpointing
        calls, n_layers = _layer_calls(model)
        loss = objective(model, caption_batch(model, 4)).loss
        forward_calls = calls["n"]
        loss.backward()
        recomputed.append(calls["n"] - forward_calls)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert forward_calls == 2 * n_layers  # the text pass and the captioning pass
    assert recomputed == [0, forward_calls]  # every checkpointed layer ran again during backward
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6, msg=name)
    model.gradient_checkpointing_disable()
    assert not model.is_activation_checkpointing
    calls, _ = _layer_calls(model)
    objective(model, caption_batch(model, 4)).loss.backward()
    assert calls["n"] == forward_calls  # no recompute after disabling


def test_training_arguments_gradient_checkpointing_reaches_the_llm(make_model, toy_cc3m, tmp_path):
    ds, _ = toy_cc3m
    model = make_model(pack_prob=0.0)
    calls, n_layers = _layer_calls(model)
    trainer = train_gill(model, ds, str(tmp_path), max_steps=1, gradient_checkpointing=True, **QUIET)
    trainer.train()
    assert model.is_activation_checkpointing
    assert calls["n"] == 2 * (2 * n_layers)  # forward + recompute of the two LLM passes of the one step


def test_train_gill_eval_split_and_hf_datasets(make_model, toy_cc3m, tmp_path):
    import datasets

    ds, store = toy_cc3m
    rows = {"text": ds.captions, "picture": [ds[i]["image"] for i in range(len(ds))]}
    hf = datasets.Dataset.from_dict(rows)
    model = make_model(pack_prob=0.0)
    trainer = train_gill(model, hf, str(tmp_path / "map"), columns={"caption": "text", "image": "picture"},
                         eval_dataset=hf.select(range(4)), targets=store, max_steps=2, eval_strategy="steps",
                         eval_steps=2, **QUIET)
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert len(train_logs) == 2 and {"caption_loss", "gen_loss", "ret_loss"} <= set(train_logs[0])
    assert len(eval_logs) == 1
    assert {"eval_caption_loss", "eval_img_token_loss", "eval_ret_loss"} <= set(eval_logs[0])
    assert "eval_gen_loss" not in eval_logs[0]  # the train store indexes train examples: no eval targets given
    metrics = trainer.evaluate()
    total = (metrics["eval_caption_loss"] + metrics["eval_img_token_loss"] + metrics["eval_ret_loss"])
    assert metrics["eval_loss"] == pytest.approx(total, rel=1e-4)  # unit weights: the terms add up

    streamed = hf.to_iterable_dataset()
    trainer = train_gill(make_model(pack_prob=0.0), streamed, str(tmp_path / "stream"),
                         columns={"caption": "text", "image": "picture"}, max_steps=2, **QUIET)
    trainer.train()
    assert len([h for h in trainer.state.log_history if "loss" in h]) == 2
    with pytest.raises(ValueError, match=r"lack \['image'\]"):
        train_gill(make_model(), hf, str(tmp_path / "bad"), max_steps=1, **QUIET)


def test_train_gill_refuses_targets_it_would_not_use(make_model, toy_cc3m, tmp_path):
    """A store train_gill's own collator would read is refused where that collator is not used, instead of
    training (or evaluating) without l_g; eval_targets alone give eval batches l_g."""
    ds, store = toy_cc3m
    model = make_model(pack_prob=0.0)
    with pytest.raises(ValueError, match="a data_collator of your own must hold the store"):
        train_gill(model, ds, str(tmp_path / "a"), data_collator=GILLDataCollator(model.processor), targets=store,
                   max_steps=1, **QUIET)
    with pytest.raises(ValueError, match="eval_targets= feeds train_gill's own eval collator"):
        train_gill(model, ds, str(tmp_path / "b"), data_collator=GILLDataCollator(model.processor, targets=store),
                   targets=store, eval_dataset=ds, eval_targets=store, max_steps=1, **QUIET)
    vist = VISTTaskDataset.from_json(write_toy_vist(tmp_path / "vist", 2))
    with pytest.raises(ValueError, match="stage 2 .* takes no targets"):
        train_gill(model, vist, str(tmp_path / "c"), targets=store, max_steps=1, **QUIET)
    with pytest.raises(ValueError, match="stage 2 .* takes no eval_targets"):
        train_gill(model, ds, str(tmp_path / "d"), eval_dataset=vist, eval_targets=store, max_steps=1, **QUIET)
    trainer = train_gill(model, ds, str(tmp_path / "e"), eval_dataset=ds, eval_targets=store, max_steps=1, **QUIET)
    assert "eval_gen_loss" in trainer.evaluate()  # used, though the train split has no store
    with pytest.raises(ValueError, match="stage 2 .* takes no targets"):
        train_gill(model, ConcatDataset([vist, vist]), str(tmp_path / "f"), targets=store, max_steps=1, **QUIET)


def test_streams_find_their_targets_by_caption_in_train_and_eval(make_model, toy_cc3m, tmp_path):
    """A stream's items have no fixed position: an index-lookup collator is refused for one, and a streamed eval
    split (here with a blank caption, which the store built from its usable captions leaves out) is looked up by
    caption."""
    import datasets

    ds, _ = toy_cc3m
    captions = list(ds.captions[:4])
    captions[1] = "  "
    rows = datasets.Dataset.from_dict({"caption": captions, "image": [ds[i]["image"] for i in range(4)]})
    store = TargetStore(precompute_targets([c for c in captions if c.strip()], tmp_path / "eval-targets",
                                           DiffusionTextEncoder(make_model().config.diffusion_model_name_or_path),
                                           dtype="float32", progress=False))
    model = make_model(pack_prob=0.0)
    with pytest.raises(ValueError, match="must find targets by caption"):
        train_gill(model, rows.to_iterable_dataset(), str(tmp_path / "a"), max_steps=1, targets=store,
                   data_collator=GILLDataCollator(model.processor, targets=store), **QUIET)
    trainer = train_gill(model, ds, str(tmp_path / "b"), eval_dataset=rows.to_iterable_dataset(),
                         eval_targets=store, max_steps=1, per_device_eval_batch_size=4, **QUIET)
    assert trainer.evaluate()["eval_gen_loss"] > 0


def test_train_gill_takes_every_training_argument_and_names_typos(make_model, toy_cc3m, tmp_path):
    ds, _ = toy_cc3m
    model = make_model()
    trainer = train_gill(model, ds, str(tmp_path), max_steps=1, lr_scheduler_type="cosine", label_smoothing_factor=0.0,
                         optim="adamw_torch", adam_epsilon=1e-7, dataloader_drop_last=True, **QUIET)
    assert trainer.args.lr_scheduler_type == "cosine" and trainer.args.adam_epsilon == 1e-7
    with pytest.raises(TypeError, match=r"'lerning_rate' \(did you mean 'learning_rate'\?\)"):
        train_gill(model, ds, str(tmp_path), lerning_rate=1e-3)
    with pytest.raises(TypeError, match=r"'eval_datasets' \(did you mean 'eval_dataset'\?\)"):
        train_gill(model, ds, str(tmp_path), eval_datasets=ds)
