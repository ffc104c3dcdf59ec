"""The gill-hf command line: one-line errors, exit status 2 for usage errors (checked before any model loads),
1 for failures, 130 when interrupted, --debug / GILL_HF_DEBUG for the traceback; YAML config fields checked by
name and type."""

import os
import subprocess
import sys

import pytest
import yaml

import gill_hf
from gill_hf.cli import main
from gill_hf.commands import looks_local
from gill_hf.commands.train import load_config


@pytest.fixture
def no_loading(monkeypatch):
    """Every model / data loader a command could reach raises: a usage error must come before them."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model or data file was loaded before the inputs were checked")

    for target in ("gill_hf.pipeline_gill.GILLPipeline.from_pretrained", "gill_hf.commands.train.build_trainer",
                   "gill_hf.evaluation.load_vist", "gill_hf.training.data.CaptionImageDataset.from_tsv",
                   "gill_hf.convert_original.convert_original_release", "gill_hf.tiny.build_tiny_backbones"):
        monkeypatch.setattr(target, forbidden)


def _run(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


def _usage(capsys, argv, message):
    code, err = _run(capsys, argv)
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith(("gill-hf: error:", "gill-hf ")), err
    assert message in err, err
    assert "Traceback" not in err


def test_argparse_usage_errors_exit_2(capsys, no_loading):
    _usage(capsys, [], "the following arguments are required")
    _usage(capsys, ["no-such-command"], "invalid choice")
    _usage(capsys, ["eval", "vist", "m", "--out", "o", "--annotations", "a", "--image-dir", "d", "--limit", "0"],
           "argument --limit: must be >= 1, got 0")
    _usage(capsys, ["generate", "p", "--text", "hi", "--top-p", "0"], "argument --top-p: must be > 0.0 and <= 1.0")
    _usage(capsys, ["generate", "p", "--text", "hi", "--max-new-tokens", "x"], "expected an integer, got 'x'")
    _usage(capsys, ["precompute-targets", "t.tsv", "o", "--diffusion-model", "sd", "--device", "gpu0"],
           "argument --device: not a torch device: 'gpu0'")
    assert main(["--help"]) == 0


def test_missing_local_paths_are_named_not_hub_errors(capsys, no_loading, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    image = tmp_path / "dog.png"
    image.write_bytes(b"")
    _usage(capsys, ["generate", "./missing-pipe", "--text", "hi"], "pipeline: no such file or folder: ./missing-pipe")
    _usage(capsys, ["generate", "runs/x/pipe", "--text", "hi"], "no such file or folder: runs/x/pipe")
    (tmp_path / "pipe").mkdir()
    _usage(capsys, ["generate", "pipe", "--text", "hi", "--image", "nope.png"], "--image: no such file or folder")
    _usage(capsys, ["generate", "pipe", "--image", str(image)], "give at least one --text")
    _usage(capsys, ["generate", "pipe", "--text", "hi", "--decision", "retrieve"], "needs a retrieval index")
    _usage(capsys, ["generate", "pipe", "--text", "hi", "--max-new-tokens", "4", "--force-image-after", "4"],
           "--force-image-after 4 cannot be met within --max-new-tokens 4")
    _usage(capsys, ["generate", "pipe", "--text", "hi", "-o", str(tmp_path)], "is a folder, expected a file")
    _usage(capsys, ["eval", "vist", "./model", "--out", "o", "--annotations", "a.json", "--image-dir", "d"],
           "model: no such file or folder: ./model")
    _usage(capsys, ["eval", "vist", "pipe", "--out", "o", "--annotations", "a.json", "--image-dir", "d"],
           "--annotations: no such file or folder: a.json")
    _usage(capsys, ["eval", "fid", "pipe", "--out", "o", "--captions", str(image), "--fid-feature", "f.pt2"],
           "--fid-feature: no such file or folder: f.pt2")
    _usage(capsys, ["precompute-targets", "c.tsv", "out", "--diffusion-model", "sd"],
           "tsv: no such file or folder: c.tsv")
    _usage(capsys, ["precompute-targets", str(image), "out", "--diffusion-model", "./sd"],
           "--diffusion-model: no such file or folder: ./sd")
    _usage(capsys, ["precompute-targets", str(image), "out", "--diffusion-model", "sd", "--process-index", "1"],
           "give --process-index and --num-processes together")
    _usage(capsys, ["precompute-targets", str(image), "out", "--diffusion-model", "sd", "--process-index", "1",
                    "--num-processes", "1"], "--process-index must be < --num-processes (1), got 1")
    _usage(capsys, ["convert-original", "--checkpoint", "ckpt.pth.tar", "--model-args", "m.json", "--out", "o"],
           "--checkpoint: no such file or folder: ckpt.pth.tar")
    _usage(capsys, ["tiny-backbones", str(image)], "is a file, expected a folder")
    _usage(capsys, ["train", "missing.yaml"], "config: no such file or folder: missing.yaml")
    _usage(capsys, ["quickstart", "--steps", "0"], "quickstart: steps must be >= 1, got 0")


def test_looks_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert not looks_local("facebook/opt-6.7b") and not looks_local("gpt2")
    for path in ("./model", "../model", "/abs/model", "~/model", "a/b/c", "runs/gill"):
        assert looks_local(path), path


def _write(tmp_path, config, name="c.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _train_config(tmp_path, tiny_backbones) -> dict:
    tsv = tmp_path / "t.tsv"
    tsv.write_text("caption\timage\na red circle\t0.png\n")
    return {"model": {"text_model": tiny_backbones["opt"], "vision_model": tiny_backbones["clip"],
                      "config": {"mapper_hidden_dim": 32}},
            "data": {"tsv": str(tsv)}, "training": {"output_dir": str(tmp_path / "run"), "learning_rate": 1.0e-4}}


def test_train_config_names_and_types_are_checked_before_loading(capsys, no_loading, tmp_path, tiny_backbones):
    base = _train_config(tmp_path, tiny_backbones)
    path = _write(tmp_path, base)
    typo = {**base, "training": {**base["training"], "learnig_rate": 1.0e-4}}
    _usage(capsys, ["train", _write(tmp_path, typo, "typo.yaml")],
           f"{tmp_path / 'typo.yaml'}: training: unknown field 'learnig_rate'; did you mean 'learning_rate'?")
    cases = {
        "training.learnig_rate=0.1": "--set training.learnig_rate=0.1: training: unknown field 'learnig_rate'; "
                                     "did you mean 'learning_rate'?",
        "training.learning_rate=1e-4": "training.learning_rate: expected float, got '1e-4' (YAML reads numbers",
        "training.max_steps=1.5": "training.max_steps: expected int, got 1.5",
        "model.config.mapper_typ=mlp": "model.config: unknown field 'mapper_typ'; did you mean 'mapper_type'?",
        "model.config.mapper_type=conv": "model.config.mapper_type: expected one of ['gill_mapper', 'linear'",
        "model.config.pack_prob=2": "model.config: GILLConfig.pack_prob must lie in [0, 1], got 2.0",
        "model.text_model=./nope": "model.text_model: no such file or folder: ./nope",
        "modle.lora=true": "unknown field 'modle'; did you mean 'model'?",
        "data.vist_tasks=[story]": "data.vist_tasks must be a non-empty list of ['gen', 'text_image', 'text']",
        "data.tsv=null": "training_stage 'align' needs data.tsv",
        "model.config.training_stage=interleaved": "training_stage 'interleaved' needs data.vist",
        "training.output_dir=null": "training.output_dir is required",
        "resume_from_checkpoint=true": "resume_from_checkpoint: true needs a checkpoint-* folder",
        "training.remove_unused_columns=true": "training: remove_unused_columns must stay False",
        "a.b.c=1": "expected section.field (or model.config.field), got 'a.b.c'",
        "training": "--set expects key.path=value, got 'training'",
    }
    for override, message in cases.items():
        _usage(capsys, ["train", path, "--set", override], message)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("model: [unclosed\n")
    _usage(capsys, ["train", str(bad_yaml)], "bad.yaml: not valid YAML")


def test_train_config_merges_and_converts_ints_for_float_fields(tmp_path, tiny_backbones):
    path = _write(tmp_path, _train_config(tmp_path, tiny_backbones))
    config = load_config(path, ["model.config.pack_prob=1", "training.max_steps=3", "model.config.lora_r=4"])
    assert config["model"]["config"] == {"mapper_hidden_dim": 32, "pack_prob": 1.0, "lora_r": 4}
    assert isinstance(config["model"]["config"]["pack_prob"], float)
    assert config["training"] == {"output_dir": str(tmp_path / "run"), "learning_rate": 1.0e-4, "max_steps": 3,
                                  "activation_checkpointing": False, "mapper_lr_mult": 1.0}
    assert config["data"]["max_length"] == 32 and config["resume_from_checkpoint"] is None


def _raising(error: BaseException):
    def run(*args, **kwargs):
        raise error

    return run


def test_failures_exit_1_debug_reraises_interrupt_exits_130(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr("gill_hf.tiny.build_tiny_backbones", _raising(RuntimeError("boom\nsecond line")))
    code, err = _run(capsys, ["tiny-backbones", str(tmp_path)])
    assert code == 1 and err == "gill-hf: error: RuntimeError: boom second line (run with --debug for the traceback)\n"
    with pytest.raises(RuntimeError, match="boom"):
        main(["--debug", "tiny-backbones", str(tmp_path)])
    monkeypatch.setenv("GILL_HF_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):
        main(["tiny-backbones", str(tmp_path)])
    monkeypatch.delenv("GILL_HF_DEBUG")
    monkeypatch.setattr("gill_hf.tiny.build_tiny_backbones", _raising(KeyboardInterrupt()))
    assert _run(capsys, ["tiny-backbones", str(tmp_path)]) == (130, "gill-hf: interrupted\n")
    monkeypatch.setattr("gill_hf.tiny.build_tiny_backbones", _raising(OSError("disk full")))
    assert _run(capsys, ["tiny-backbones", str(tmp_path)]) == (
        1, "gill-hf: error: disk full (run with --debug for the traceback)\n")


def test_exit_codes_in_a_real_process(tmp_path):
    src = os.path.dirname(os.path.dirname(gill_hf.__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    env.pop("GILL_HF_DEBUG", None)
    done = subprocess.run([sys.executable, "-m", "gill_hf.cli", "generate", "./missing", "--text", "hi"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "gill-hf: error: pipeline: no such file or folder: ./missing"
    assert "Traceback" not in done.stderr
