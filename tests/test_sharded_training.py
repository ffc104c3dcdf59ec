"""FSDP2 through accelerate's FSDP plugin (examples/accelerate/fsdp2.yaml), 2 CPU processes on gloo: the frozen LLM
is sharded, the adapter stays whole; the first step equals one process on the same global batch; checkpoints hold
the adapter (and its optimizer state) only, load with ``from_pretrained`` and resume to the uninterrupted result.

accelerate enables its FSDP plugin only on accelerator devices (cuda, xpu, npu...); run as a script, this file
lifts that one gate so the real FSDP2 path (accelerate's ``fsdp2_prepare_model``, ``fully_shard``, the Trainer's
FSDP branches) runs on CPU processes. Nothing else is patched.
"""

import json
import os
import runpy
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
EXAMPLE = os.path.join(ROOT, "examples", "train_stage1.py")
FSDP2_CONFIG = os.path.join(ROOT, "examples", "accelerate", "fsdp2.yaml")


def _run(cmd, env):
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process on 4 pairs per step, and 2 FSDP2 processes on 2 pairs each (2 steps, a checkpoint per step,
    then a resume from checkpoint-1 in the same processes)."""
    root = tmp_path_factory.mktemp("sharded")
    worker = [__file__, "--tiny", str(root / "tiny")]
    _run([sys.executable, *worker, "--output-dir", str(root / "one"), "--batch-size", "4", "--max-steps", "1"],
         _env())
    _run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", FSDP2_CONFIG, "--num_processes", "2",
          "--mixed_precision", "no", "--main_process_port", "29533", *worker, "--output-dir", str(root / "fsdp"),
          "--batch-size", "2", "--max-steps", "2", "--resume"], _env())
    return root


def test_fsdp2_shards_the_frozen_llm_and_keeps_the_adapter_whole(runs):
    report = json.loads((runs / "fsdp" / "sharding.json").read_text())
    llm = {k: v for k, v in report.items() if k.startswith("language_model.")}
    assert llm and all(v["dtensor"] for v in llm.values())
    assert any(v["local"] < v["full"] for v in llm.values())  # rows split over the 2 processes
    adapter = {k: v for k, v in report.items() if k.startswith("adapter.")}
    assert adapter and not any(v["dtensor"] for v in adapter.values())
    assert all(v["local"] == v["full"] for v in adapter.values())


def test_fsdp2_first_step_equals_single_process(runs):
    logs = [json.loads((runs / run / "log_history.json").read_text())[0] for run in ("one", "fsdp")]
    assert logs[0]["step"] == logs[1]["step"] == 1
    assert logs[1]["loss"] == pytest.approx(logs[0]["loss"], rel=1e-6)
    assert logs[1]["grad_norm"] == pytest.approx(logs[0]["grad_norm"], rel=1e-5)  # same averaged gradient
    assert logs[1]["ret_loss"] == pytest.approx(logs[0]["ret_loss"], rel=1e-6)  # InfoNCE over all 4 pairs
    # as in test_distributed: Adam's first step moves pure-rounding-noise gradients by a fraction of lr
    one = load_file(runs / "one" / "model.safetensors")
    two = load_file(runs / "fsdp" / "checkpoint-1" / "model.safetensors")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=0, atol=3e-4, msg=key)


def test_fsdp2_checkpoints_hold_only_the_adapter(runs):
    from gill_hf import GILLForConditionalGeneration

    out = runs / "fsdp"
    for folder in (out, out / "checkpoint-1", out / "checkpoint-2"):
        names = set(os.listdir(folder))
        assert not any("fsdp" in name for name in names), names  # no (sharded) full-model state
        weights = load_file(folder / "model.safetensors")
        assert weights and all(key.startswith("adapter.") for key in weights)
    trainable = json.loads((out / "trainable.json").read_text())
    optimizer = torch.load(out / "checkpoint-1" / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(trainable)  # Adam moments of the adapter's trainable tensors only
    model = GILLForConditionalGeneration.from_pretrained(out)
    final = load_file(out / "model.safetensors")
    for key, value in model.adapter_state_dict().items():
        torch.testing.assert_close(value, final[key], rtol=0, atol=0, msg=key)


def test_fsdp2_resume_from_checkpoint_reaches_the_uninterrupted_step(runs):
    straight = load_file(runs / "fsdp" / "checkpoint-2" / "model.safetensors")
    resumed = load_file(runs / "fsdp-resumed" / "model.safetensors")
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("change, message", [
    (dict(fsdp_version=1), "fsdp_version: 2"),
    (dict(ignored_modules="language_model.*"), "fsdp_ignored_modules is set by GILLTrainer"),
    (dict(train_llm_row=True), "only the adapter may train"),
])
def test_fsdp_plan_problems_are_named(make_model, change, message):
    from types import SimpleNamespace

    from gill_hf.training.distributed import fsdp_plan_problem

    model = make_model()
    plugin = SimpleNamespace(fsdp_version=2, ignored_modules=[model.adapter])  # an earlier trainer's choice
    assert fsdp_plan_problem(model, plugin) is None
    if change.pop("train_llm_row", False):
        model.language_model.get_input_embeddings().weight.requires_grad_(True)
    vars(plugin).update(change)
    assert message in fsdp_plan_problem(model, plugin)


def _allow_fsdp_on_cpu():
    """accelerate sets its FSDP plugin only for accelerator devices; apply it to CPU processes as well."""
    import accelerate.state as state

    init = state.AcceleratorState.__init__

    def patched(self, *args, fsdp_plugin=None, **kwargs):
        init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = state.DistributedType.FSDP, fsdp_plugin

    state.AcceleratorState.__init__ = patched


def _sharding_report(model) -> dict:
    from torch.distributed.tensor import DTensor

    return {name: {"dtensor": isinstance(p, DTensor), "full": p.numel(),
                   "local": p.to_local().numel() if isinstance(p, DTensor) else p.numel()}
            for name, p in model.named_parameters()}


def main():
    """Stage 1 on the example's tiny setup: 1 step, or (--resume) 2 steps with a checkpoint per step and then a
    resume from checkpoint-1 into <output-dir>-resumed; writes log_history.json (and, distributed, sharding.json / trainable.json)."""
    import argparse

    from gill_hf import GILLForConditionalGeneration
    from gill_hf.training import CaptionImageDataset, TargetStore, train_gill

    parser = argparse.ArgumentParser()
    for flag in ("--tiny", "--output-dir"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args()
    _allow_fsdp_on_cpu()
    example = runpy.run_path(EXAMPLE, run_name="train_stage1")
    backbones, tsv, targets = example["tiny_setup"](args.tiny, num_pairs=16)

    def trainer(output_dir):
        torch.manual_seed(0)
        model = GILLForConditionalGeneration.from_backbones(backbones["opt"], backbones["clip"], backbones["sd"],
                                                            pack_prob=0.0, **example["TINY_MAPPER"])
        return train_gill(model, CaptionImageDataset.from_tsv(tsv), output_dir, targets=TargetStore(targets),
                          max_steps=args.max_steps, per_device_train_batch_size=args.batch_size, logging_steps=1,
                          seed=0, disable_tqdm=True, use_cpu=True, save_strategy="steps", save_steps=1)

    first = trainer(args.output_dir)
    first.train()
    first.save_model()
    main_process = first.is_world_process_zero()
    if main_process:
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
            json.dump(first.state.log_history, f)
    if torch.distributed.is_initialized():
        if main_process:
            with open(os.path.join(args.output_dir, "sharding.json"), "w") as f:
                json.dump(_sharding_report(first.model), f)
            with open(os.path.join(args.output_dir, "trainable.json"), "w") as f:
                json.dump([n for n, p in first.model.named_parameters() if p.requires_grad], f)
    if args.resume:
        second = trainer(args.output_dir + "-resumed")  # a fresh model, as a restarted job builds
        second.train(resume_from_checkpoint=os.path.join(args.output_dir, "checkpoint-1"))
        second.save_model()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
