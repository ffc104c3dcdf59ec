"""DeepSpeed ZeRO-3 through accelerate's DeepSpeed plugin (examples/accelerate/deepspeed_zero3.yaml), 2 CPU processes
on gloo: the frozen LLM is partitioned, the adapter trains; the first two steps equal one process on the same global
batches, and the [IMG]-row renormalisation reaches ZeRO's fp32 masters (no gap to the rows); checkpoints hold the
adapter only and load with ``from_pretrained``; ``logit_scale`` keeps its saved shape ``()``; resuming is refused.

Run as a script, this file lifts two CPU-only gates and patches nothing else: accelerate picks no communication
backend for DeepSpeed processes without an accelerator device (they get gloo, as accelerate's multi-CPU runs), and
DeepSpeed's communication layer would JIT-compile a shared-memory all-reduce op on a CPU when it starts (minutes):
that op is marked unavailable (``deepspeed.ops.__compatible_ops__``), so DeepSpeed uses torch.distributed's gloo
directly and nothing is compiled.
"""

import json
import os
import runpy
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("deepspeed")

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXAMPLE = os.path.join(ROOT, "examples", "train_stage1.py")
ZERO3_CONFIG = os.path.join("examples", "accelerate", "deepspeed_zero3.yaml")  # its JSON path is relative to ROOT


def _run(cmd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process on 4 pairs per step, and 2 ZeRO-3 processes on 2 pairs each; 2 steps, a checkpoint per step."""
    root = tmp_path_factory.mktemp("zero3")
    worker = [os.path.abspath(__file__), "--tiny", str(root / "tiny")]
    _run([sys.executable, *worker, "--output-dir", str(root / "one"), "--batch-size", "4"])
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", ZERO3_CONFIG, "--num_processes", "2",
          "--main_process_port", "29541", *worker, "--output-dir", str(root / "zero3"), "--batch-size", "2"])
    return root


def test_zero3_partitions_the_frozen_llm(runs):
    report = json.loads((runs / "zero3" / "sharding.json").read_text())
    llm = {k: v for k, v in report.items() if k.startswith("language_model.")}
    assert llm and all(v["partitioned"] for v in llm.values())
    assert sum(v["local"] for v in llm.values()) * 2 >= sum(v["full"] for v in llm.values())
    assert all(v["local"] < v["full"] for v in llm.values() if v["full"] > 1)  # split over the 2 processes


def test_zero3_steps_equal_single_process(runs):
    logs = [[entry for entry in json.loads((runs / run / "log_history.json").read_text()) if "loss" in entry]
            for run in ("one", "zero3")]
    assert [e["step"] for e in logs[0]] == [e["step"] for e in logs[1]] == [1, 2]
    for one, zero3 in zip(*logs):
        assert zero3["loss"] == pytest.approx(one["loss"], rel=1e-5)
        assert zero3["ret_loss"] == pytest.approx(one["ret_loss"], rel=1e-5)  # InfoNCE over all 4 pairs
    assert logs[1][0]["grad_norm"] == pytest.approx(logs[0][0]["grad_norm"], rel=1e-5)  # same averaged gradient
    assert json.loads((runs / "zero3" / "sizes.json").read_text())["master_gap"] == 0  # renormalised in ZeRO too
    # as in test_distributed: Adam's first step moves pure-rounding-noise gradients by a fraction of lr
    for folder in ("checkpoint-1", "checkpoint-2"):
        one = load_file(runs / "one" / folder / "model.safetensors")
        two = load_file(runs / "zero3" / folder / "model.safetensors")
        assert one.keys() == two.keys()
        for key in one:
            assert two[key].shape == one[key].shape, key  # logit_scale stays 0-dim on disk
            torch.testing.assert_close(two[key], one[key], rtol=0, atol=3e-4, msg=f"{folder} {key}")


def test_zero3_checkpoints_hold_only_the_adapter(runs):
    from gill_hf import GILLForConditionalGeneration

    out = runs / "zero3"
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        weights = load_file(folder / "model.safetensors")
        assert weights and all(key.startswith("adapter.") for key in weights)
    engine_files = sorted((out / "checkpoint-2" / "global_step2").iterdir())
    assert engine_files and max(f.stat().st_size for f in engine_files) < json.loads(
        (out / "sizes.json").read_text())["llm_bytes"]  # nothing there holds the frozen LLM
    model = GILLForConditionalGeneration.from_pretrained(out)
    final = load_file(out / "model.safetensors")
    assert final["adapter.logit_scale"].shape == ()
    for key, value in model.adapter_state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0, msg=key)


ZERO3 = {"zero_optimization": {"stage": 3}}
ARGS = SimpleNamespace(load_best_model_at_end=False)


@pytest.mark.parametrize("change, message", [
    (dict(stage=2), "zero_optimization.stage to 3"),
    (dict(train_llm_row=True), "only the adapter may train"),
    (dict(load_best_model_at_end=True), "load_best_model_at_end=True: resuming under DeepSpeed is not supported"),
])
def test_deepspeed_plan_problems_are_named(make_model, change, message):
    from gill_hf.training.distributed import deepspeed_plan_problem, prepare_for_zero3

    model = make_model()
    assert deepspeed_plan_problem(model, ZERO3, ARGS) is None
    if change.get("train_llm_row"):
        model.language_model.get_input_embeddings().weight.requires_grad_(True)
    config = {"zero_optimization": {"stage": change.get("stage", 3)}}
    args = SimpleNamespace(load_best_model_at_end=change.get("load_best_model_at_end", False))
    assert message in deepspeed_plan_problem(model, config, args)
    with pytest.raises(ValueError, match=message):
        prepare_for_zero3(model, config, args)
    assert model.adapter.logit_scale.dim() == 0  # nothing changed before the error


def test_zero3_logit_scale_keeps_its_saved_shape(make_model, tmp_path):
    from gill_hf import GILLForConditionalGeneration
    from gill_hf.training.distributed import prepare_for_zero3

    model = make_model()
    with torch.no_grad():
        model.adapter.logit_scale.fill_(2.5)
    prepare_for_zero3(model, ZERO3, ARGS)
    assert model.adapter.logit_scale.shape == (1,)  # DeepSpeed cannot broadcast or partition a 0-dim tensor
    external = {id(p) for p in model._external_params.values()}  # gathered for every GILL forward
    assert external == {id(p) for p in model.adapter.parameters(recurse=False)}
    assert model.adapter_state_dict()["adapter.logit_scale"].shape == ()
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / "model.safetensors")["adapter.logit_scale"].shape == ()
    assert GILLForConditionalGeneration.from_pretrained(tmp_path).adapter.logit_scale.item() == 2.5
    model.load_adapter_state_dict({**model.adapter_state_dict(), "adapter.logit_scale": torch.tensor(1.5)})
    assert model.adapter.logit_scale.tolist() == [1.5]


def test_resume_under_deepspeed_is_refused_before_training(make_model, tmp_path):
    from PIL import Image

    from gill_hf.training import CaptionImageDataset, train_gill

    data = CaptionImageDataset(["a red square"], [Image.new("RGB", (8, 8), "red")])
    trainer = train_gill(make_model(), data, str(tmp_path), use_cpu=True, max_steps=1)
    trainer.is_deepspeed_enabled = True  # what accelerate launch with deepspeed_zero3.yaml leads to
    with pytest.raises(ValueError, match="resume_from_checkpoint=True: resuming under DeepSpeed is not supported"):
        trainer.train(resume_from_checkpoint=True)
    assert trainer.state.global_step == 0 and not os.listdir(tmp_path)


def _allow_deepspeed_on_cpu():
    """Give accelerate's DeepSpeed processes gloo where no accelerator device is found; compile no op."""
    import accelerate.state as state
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    prepare = state.PartialState._prepare_backend

    def patched(self, *args, **kwargs):
        backend, distributed_type = prepare(self, *args, **kwargs)
        if backend is None and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
            return "gloo", state.DistributedType.MULTI_CPU
        return backend, distributed_type

    state.PartialState._prepare_backend = patched


def _master_gap(model) -> float:
    """Largest |ZeRO's fp32 master - the model's tensor| over the [IMG] rows (renormalised after each step)."""
    from deepspeed.utils import safe_get_full_fp32_param

    from gill_hf.training.distributed import gathered

    rows = [row for row in (model.adapter.img_embeddings, model.adapter.img_output_embeddings) if row is not None]
    masters = [safe_get_full_fp32_param(row) for row in rows]
    with gathered(rows):
        return max((master - row.detach()).abs().max().item() for master, row in zip(masters, rows))


def _partition_report(model) -> dict:
    return {name: {"partitioned": hasattr(p, "ds_id"), "full": getattr(p, "ds_numel", p.numel()),
                   "local": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()}
            for name, p in model.named_parameters()}


def main():
    """Stage 1 on the example's tiny setup, 2 steps with a checkpoint per step; writes log_history.json (and,
    distributed, sharding.json / sizes.json)."""
    import argparse

    parser = argparse.ArgumentParser()
    for flag in ("--tiny", "--output-dir"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    args = parser.parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        _allow_deepspeed_on_cpu()

    from gill_hf import GILLForConditionalGeneration
    from gill_hf.training import CaptionImageDataset, TargetStore, train_gill

    example = runpy.run_path(EXAMPLE, run_name="train_stage1")
    backbones, tsv, targets = example["tiny_setup"](args.tiny, num_pairs=16)
    torch.manual_seed(0)
    model = GILLForConditionalGeneration.from_backbones(backbones["opt"], backbones["clip"], backbones["sd"],
                                                        pack_prob=0.0, **example["TINY_MAPPER"])
    llm_bytes = sum(p.numel() * p.element_size() for p in model.language_model.parameters())
    trainer = train_gill(model, CaptionImageDataset.from_tsv(tsv), args.output_dir, targets=TargetStore(targets),
                         max_steps=2, per_device_train_batch_size=args.batch_size, logging_steps=1, seed=0,
                         disable_tqdm=True, use_cpu=not distributed, save_strategy="steps", save_steps=1)
    trainer.train()
    trainer.save_model()
    gap = _master_gap(trainer.model) if distributed else None
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f)
        if distributed:
            with open(os.path.join(args.output_dir, "sharding.json"), "w") as f:
                json.dump(_partition_report(trainer.model), f)
            with open(os.path.join(args.output_dir, "sizes.json"), "w") as f:
                json.dump({"llm_bytes": llm_bytes, "master_gap": gap}, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
