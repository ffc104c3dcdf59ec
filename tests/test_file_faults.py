"""Damaged, missing, torn and half-written model folders and checkpoints: each is a clear error naming the file,
raised before the backbones load, or is never loaded at all (a reader sees one complete save, never a mix)."""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch
from transformers import TrainerCallback

from gill_hf import GILLForConditionalGeneration, atomic
from gill_hf.training import CaptionImageDataset, apply_lora, train_gill
from gill_hf.toy_world import write_toy_cc3m
from gill_hf.training.trainer import checkpoint_problem, last_complete_checkpoint

QUIET = dict(disable_tqdm=True, logging_steps=1, per_device_train_batch_size=4, dataloader_num_workers=0,
             use_cpu=True, seed=0)


@pytest.fixture(scope="module")
def saved(make_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "model"
    make_model("opt", seed=1).save_pretrained(folder)
    return folder


@pytest.fixture
def no_backbones(monkeypatch):
    """Loading the backbones fails the test: the errors under test must come first."""
    def fail(*args, **kwargs):
        raise AssertionError("the backbones were loaded before the damaged file was reported")

    monkeypatch.setattr(GILLForConditionalGeneration, "_load_backbones", staticmethod(fail))


@pytest.fixture
def fast_retry(monkeypatch):
    monkeypatch.setattr(atomic, "LOAD_RETRY_SECONDS", 0.05)


def _copy(saved, tmp_path, manifest: bool = True):
    folder = tmp_path / "model"
    shutil.copytree(saved, folder)
    if not manifest:  # an older save, or a folder edited by hand
        (folder / atomic.MANIFEST_NAME).unlink()
    return folder


def _truncate(path, keep: int):
    """Keep the first ``keep`` bytes (negative: drop the last ``-keep``)."""
    path.write_bytes(path.read_bytes()[:keep])


# ---------------------------------------------------------------------------------------------- weight files
def test_truncated_or_corrupt_weights_are_named_before_the_backbones_load(saved, tmp_path, no_backbones):
    folder = _copy(saved, tmp_path, manifest=False)
    weights = folder / "model.safetensors"
    good = weights.read_bytes()
    _truncate(weights, -100)
    with pytest.raises(OSError, match=re.escape(str(weights)) + rf" is truncated: {len(good) - 100} bytes, its "
                                      rf"header describes {len(good)}"):
        GILLForConditionalGeneration.from_pretrained(folder)
    _truncate(weights, 5)
    with pytest.raises(OSError, match=re.escape(str(weights)) + " is truncated or not a safetensors file: 5 bytes"):
        GILLForConditionalGeneration.from_pretrained(folder)
    weights.write_bytes((12).to_bytes(8, "little") + b"not a header")
    with pytest.raises(OSError, match=re.escape(str(weights)) + " has a corrupt safetensors header"):
        GILLForConditionalGeneration.from_pretrained(folder)


def test_a_truncated_file_of_a_manifested_save_is_a_torn_save(saved, tmp_path, no_backbones, fast_retry):
    folder = _copy(saved, tmp_path)
    size = (folder / "model.safetensors").stat().st_size
    _truncate(folder / "model.safetensors", -100)
    with pytest.raises(atomic.TornSaveError, match=re.escape(str(folder)) + rf": model.safetensors has {size - 100} "
                                                   rf"bytes, the manifest says {size}"):
        GILLForConditionalGeneration.from_pretrained(folder)


def test_weight_dtypes_and_shapes_are_checked_against_the_config_first(saved, tmp_path, no_backbones):
    folder = _copy(saved, tmp_path, manifest=False)
    state = safetensors.torch.load_file(folder / "model.safetensors")
    state["adapter.w_cap.weight"] = state["adapter.w_cap.weight"].long()
    state["adapter.w_i2t.weight"] = torch.zeros(7, 32)
    safetensors.torch.save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=re.escape(f"adapter weights in {folder / 'model.safetensors'} do not match")
                       + r".*wrong shapes \(1\): \['adapter.w_i2t.weight: checkpoint \(7, 32\) vs model \(256, 32\)'\]"
                       r"; not a float dtype \(1\): \['adapter.w_cap.weight: I64'\]"):
        GILLForConditionalGeneration.from_pretrained(folder)


def test_a_missing_folder_is_named_not_taken_for_a_hub_id(tmp_path):
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(f"no such folder {str(missing)!r}")):
        GILLForConditionalGeneration.from_pretrained(missing)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(NotADirectoryError, match="config.json is a file"):
        GILLForConditionalGeneration.from_pretrained(tmp_path / "config.json")


def test_a_deleted_lora_folder_is_an_error_not_a_model_without_lora(make_model, tmp_path, fast_retry):
    model = apply_lora(make_model("llama"))
    with torch.no_grad():
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                param.normal_()  # B starts at zero: make the LoRA change the outputs
    model.save_pretrained(tmp_path / "tuned")
    assert json.loads((tmp_path / "tuned" / "config.json").read_text())["use_lora"] is True
    reloaded = GILLForConditionalGeneration.from_pretrained(tmp_path / "tuned")
    assert hasattr(reloaded.language_model, "peft_config")
    ids = torch.tensor([[1, 5, 6, 7]])
    model.eval()  # no LoRA dropout
    with torch.no_grad():
        torch.testing.assert_close(reloaded.language_model(ids).logits, model.language_model(ids).logits)

    shutil.rmtree(tmp_path / "tuned" / "lora")
    with pytest.raises(atomic.TornSaveError, match=r"tuned: lora/\S+ is missing"):
        GILLForConditionalGeneration.from_pretrained(tmp_path / "tuned")
    (tmp_path / "tuned" / atomic.MANIFEST_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tuned" / "lora")) + " is missing: config.json "
                                                "records a LoRA-tuned language model"):
        GILLForConditionalGeneration.from_pretrained(tmp_path / "tuned")


def test_the_saved_config_records_lora_only_when_lora_is_saved(make_model, tmp_path):
    model = make_model("opt", use_lora=True)  # LoRA asked for but not applied yet
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_lora"] is False
    assert model.config.use_lora is True  # the model's own config is left as it was
    assert not hasattr(GILLForConditionalGeneration.from_pretrained(tmp_path).language_model, "peft_config")


def test_save_manifests_stay_local_when_pushed(fake_hub, make_model, tiny_backbones, tmp_path):
    from gill_hf import GILLPipeline

    model = make_model("opt")
    model.push_to_hub("alice/gill-no-manifest", model_card=False)
    pipe = GILLPipeline.from_gill(model)
    pipe.save_pretrained(tmp_path / "pipe")  # the pipeline save is atomic too: a manifest there and in gill_model/
    assert (tmp_path / "pipe" / atomic.MANIFEST_NAME).is_file()
    assert (tmp_path / "pipe" / "gill_model" / atomic.MANIFEST_NAME).is_file()
    pipe.push_to_hub("alice/gill-pipe-no-manifest", model_card=False)
    for repo in ("alice/gill-no-manifest", "alice/gill-pipe-no-manifest"):
        files = fake_hub.repos[repo].files()
        assert "config.json" in files or "model_index.json" in files
        assert not [name for name in files if name.endswith(atomic.MANIFEST_NAME)], sorted(files)
    assert GILLForConditionalGeneration.from_pretrained("alice/gill-no-manifest").processor is not None


# ---------------------------------------------------------------------------------------------- concurrent saves
WRITER = r"""
import os, sys, time
from gill_hf import GILLForConditionalGeneration

source_a, source_b, target, control = sys.argv[1:5]
models = [GILLForConditionalGeneration.from_pretrained(s) for s in (source_a, source_b)]


def hang(staging, *args, **kwargs):  # a save killed while it is being written
    with open(os.path.join(staging, "tokenizer.json"), "w") as handle:
        handle.write("{half")
    open(os.path.join(control, "hanging"), "w").close()
    time.sleep(600)


saves = 0
while not os.path.exists(os.path.join(control, "hang")):
    models[saves % 2].save_pretrained(target)
    saves += 1
    if saves == 2:
        open(os.path.join(control, "ready"), "w").close()
models[0].processor.save_pretrained = hang
models[0].save_pretrained(target)
"""
SIGNATURES = {"A": (0.25, 25.0, 100, 11), "B": (0.75, 75.0, 200, 22)}  # threshold, logit scale, context, tokens


def _make_distinct(model, name):
    """Config, weights, processor and generation config all carry the model's name."""
    threshold, scale, context, tokens = SIGNATURES[name]
    model.config.decision_threshold = threshold
    with torch.no_grad():
        model.adapter.logit_scale.fill_(scale)
    model.processor.context_length = context
    model.generation_config.max_new_tokens = tokens
    return model


def _which(threshold, scale, context, tokens) -> str:
    """The save every part comes from; a mix of two saves fails here."""
    names = [next(n for n, sig in SIGNATURES.items() if sig[i] == value)
             for i, value in enumerate((threshold, scale, context, tokens))]
    assert len(set(names)) == 1, f"a mix of two saves: {names}"
    return names[0]


def _read_files(root):
    config = json.loads((root / "config.json").read_text())
    scale = safetensors.torch.load_file(root / "model.safetensors")["adapter.logit_scale"].item()
    context = json.loads((root / "processor_config.json").read_text())["context_length"]
    tokens = json.loads((root / "generation_config.json").read_text())["max_new_tokens"]
    return _which(config["decision_threshold"], scale, context, tokens)


def _load(folder, backbones):
    model = GILLForConditionalGeneration.from_pretrained(folder, language_model=backbones.language_model,
                                                         vision_model=backbones.vision_model)
    return _which(model.config.decision_threshold, model.adapter.logit_scale.item(), model.processor.context_length,
                  model.generation_config.max_new_tokens)


def _wait_for(path, process, log, seconds=300):
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def test_loads_during_concurrent_saves_see_one_save_and_a_killed_save_leaves_the_last(make_model, tmp_path):
    model_a = _make_distinct(make_model("opt", seed=1), "A")
    model_b = _make_distinct(make_model("opt", seed=2), "B")
    model_a.save_pretrained(tmp_path / "a")
    model_b.save_pretrained(tmp_path / "b")
    target, control = tmp_path / "target", tmp_path / "control"
    control.mkdir()
    model_a.save_pretrained(target)
    log = tmp_path / "writer.log"  # a file, not a pipe: an undrained pipe fills with progress bars and blocks it
    with open(log, "w") as stderr:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "a"), str(tmp_path / "b"),
                                   str(target), str(control)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                                  stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        _wait_for(control / "ready", writer, log)
        seen = []
        for _ in range(200):  # the files of the snapshot from_pretrained reads, parsed directly: fast
            with atomic.verified_snapshot(target) as root:
                seen.append(_read_files(pathlib.Path(root)))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # whole loads through from_pretrained (backbones reused in memory)
            seen.append(_load(target, model_a))
        assert writer.poll() is None, log.read_text()[-3000:]
        switches = sum(x != y for x, y in zip(seen, seen[1:]))
        assert {"A", "B"} <= set(seen) and switches >= 4, (switches, len(seen))  # saves really ran meanwhile

        (control / "hang").touch()
        _wait_for(control / "hanging", writer, log)
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait()
    staging = [p for p in target.iterdir() if p.name.startswith(f"{atomic.STAGING_PREFIX}{atomic._host()}-"
                                                                f"{writer.pid}-")]
    assert len(staging) == 1 and (staging[0] / "tokenizer.json").read_text() == "{half"
    last = _read_files(target)  # the writer is gone: the folder's files as they are
    assert _load(target, model_a) == last  # the last complete save, whole
    model_b.save_pretrained(target)  # the next save removes the dead writer's staging folder
    assert not staging[0].exists() and _load(target, model_a) == "B"


# ---------------------------------------------------------------------------------------------- Trainer checkpoints
@pytest.fixture(scope="module")
def checkpoints(make_model, tmp_path_factory):
    """A 4-step run that saved checkpoint-2 and checkpoint-4 (copied per test)."""
    root = tmp_path_factory.mktemp("run")
    ds = CaptionImageDataset.from_tsv(write_toy_cc3m(root / "data", 8))
    train_gill(make_model(), ds, str(root / "out"), max_steps=4, save_strategy="steps", save_steps=2,
               **QUIET).train()
    return ds, root / "out"


class StartStep(TrainerCallback):
    """Records the step each ``train()`` starts from (after a resume has loaded its state)."""

    def __init__(self):
        self.steps = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)


def _run_copy(checkpoints, tmp_path):
    ds, out = checkpoints
    shutil.copytree(out, tmp_path / "out")
    return ds, tmp_path / "out"


def test_resume_true_skips_a_checkpoint_left_incomplete_by_a_kill(make_model, checkpoints, tmp_path):
    ds, out = _run_copy(checkpoints, tmp_path)
    newest = out / "checkpoint-4"
    _truncate(newest / "trainer_state.json", 40)  # killed while the Trainer wrote its last file
    assert checkpoint_problem(newest) == "trainer_state.json is truncated or not JSON"
    assert last_complete_checkpoint(out) == str(out / "checkpoint-2")
    start = StartStep()
    trainer = train_gill(make_model(seed=5), ds, str(out), max_steps=4, save_strategy="steps", save_steps=2,
                         callbacks=[start], **QUIET)
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {newest} is incomplete (trainer_state.json is "
                                                   "truncated or not JSON)")):
        trainer.train(resume_from_checkpoint=str(newest))
    assert start.steps == []  # refused before training began
    trainer.train(resume_from_checkpoint=True)
    assert start.steps == [2] and trainer.state.global_step == 4  # went on from checkpoint-2
    assert checkpoint_problem(newest) is None  # and wrote step 4 again, completely


def test_checkpoints_missing_their_state_or_with_torn_weights_are_incomplete(checkpoints, tmp_path):
    _, out = _run_copy(checkpoints, tmp_path)
    assert checkpoint_problem(out / "checkpoint-2") is None and checkpoint_problem(out / "checkpoint-4") is None
    (out / "checkpoint-4" / "trainer_state.json").unlink()  # killed while writing the optimizer state
    assert checkpoint_problem(out / "checkpoint-4") == "trainer_state.json is missing"
    _truncate(out / "checkpoint-2" / "model.safetensors", -10)
    assert checkpoint_problem(out / "checkpoint-2").startswith(
        "its model files do not match their manifest: model.safetensors has")
    with pytest.raises(ValueError, match=r"no complete checkpoint in .*checkpoint-4: trainer_state.json is missing; "
                                         r".*checkpoint-2: its model files"):
        last_complete_checkpoint(out)
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-6")
    assert checkpoint_problem(out / "checkpoint-6") == f"trainer_state.json records step {state['global_step']}, not 6"
