"""The example scripts run end to end on tiny backbones (``--tiny``), in-process, with their real argv parsing."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from gill_hf.toy_world import shape_corpus

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *argv: str, monkeypatch):
    monkeypatch.setattr(sys, "argv", [name, *map(str, argv)])
    runpy.run_path(str(EXAMPLES / name), run_name="__main__")


def test_load_original_release(tmp_path, tiny_backbones, monkeypatch, capsys, single_thread):
    run_example("load_original_release.py", "--tiny", tmp_path, "--out", tmp_path / "converted", "--steps", 2,
                monkeypatch=monkeypatch)
    out = capsys.readouterr().out
    assert "converted" in out and "image: " in out
    weights = safetensors.torch.load_file(tmp_path / "converted" / "model.safetensors")
    assert weights["adapter.img_embeddings"].shape == (8, 64)
    assert (tmp_path / "converted" / "retrieval_index").is_dir()


def test_generate_interleaved_with_retrieval(tmp_path, tiny_backbones, monkeypatch, capsys, single_thread):
    images = []
    for i, (image, _) in enumerate(shape_corpus(3, seed=2, size=48)):
        images.append(tmp_path / f"photo{i}.png")
        image.save(images[-1])
    run_example("generate_interleaved.py", "--tiny", tmp_path, "--image", images[0], "--index-images", *images,
                "--steps", 2, "--out", tmp_path / "answer.html", monkeypatch=monkeypatch)
    page = (tmp_path / "answer.html").read_text()
    assert page.count("<img") >= 2 and "P(retrieve)=" in page  # the prompt image + the answer's image
    assert "wrote" in capsys.readouterr().out


def test_push_to_hub(tmp_path, tiny_backbones, fake_hub, monkeypatch, capsys):
    run_example("push_to_hub.py", "--tiny", tmp_path, "--repo-id", "bob/gill-example", "--dataset", "cc3m",
                monkeypatch=monkeypatch)
    files = fake_hub.repos["bob/gill-example"].files()
    assert {"model.safetensors", "config.json", "README.md"} <= set(files)
    assert "cc3m" in files["README.md"].decode() and "pushed bob/gill-example" in capsys.readouterr().out


def test_train_decision_and_stage2(tmp_path, tiny_backbones, monkeypatch, capsys):
    run_example("train_decision.py", "--tiny", tmp_path / "backbones", "--steps", 5, "--out", tmp_path / "decision",
                monkeypatch=monkeypatch)
    assert (tmp_path / "decision" / "model.safetensors").is_file()
    run_example("train_stage2_lora.py", "--tiny", tmp_path, "--output-dir", tmp_path / "stage2", "--max-steps", 1,
                "--cpu", monkeypatch=monkeypatch)
    assert (tmp_path / "stage2" / "lora" / "adapter_model.safetensors").is_file()


def test_train_minigpt5(tmp_path, tiny_backbones, monkeypatch):
    run_example("train_minigpt5.py", "--tiny", tmp_path, "--output-dir", tmp_path / "out", "--cpu",
                monkeypatch=monkeypatch)
    one, two = (safetensors.torch.load_file(tmp_path / "out" / s / "model.safetensors") for s in ("stage1", "stage2"))
    config = json.loads((tmp_path / "out" / "stage2" / "config.json").read_text())
    assert config["training_stage"] == "interleaved" and config["use_lora"]
    assert (tmp_path / "out" / "stage2" / "lora" / "adapter_model.safetensors").is_file()
    # stage 2 trains the mapper transformer but, as MiniGPT-5, not its input MLP nor the queries
    for key in ("adapter.mapper.queries", "adapter.mapper.in_proj.0.weight"):
        assert torch.equal(one[key], two[key]), key
    assert not torch.equal(one["adapter.mapper.transformer.decoder.norm.weight"],
                           two["adapter.mapper.transformer.decoder.norm.weight"])


def test_train_minigpt5_tiny_refuses_backbone_and_data_options(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_example("train_minigpt5.py", "--tiny", tmp_path, "--output-dir", tmp_path / "out", "--text-model", "x",
                    "--vist-images", "y", monkeypatch=monkeypatch)
    assert exit_info.value.code == 2
    assert "--tiny builds its own backbones and data; drop --text-model, --vist-images" in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(p.name for p in EXAMPLES.glob("*.py")))
def test_every_example_documents_its_tiny_run(name):
    source = (EXAMPLES / name).read_text()
    assert source.startswith('"""') and "--tiny" in source, f"{name} needs a docstring with its --tiny command"


def test_evaluate_vist(tmp_path, tiny_backbones, monkeypatch, capsys, single_thread):
    from eval_fixtures import stub_alexnet_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # LPIPS' AlexNet: a random stand-in, offline
    stub_alexnet_weights(str(tmp_path / "torch_home"))
    run_example("evaluate.py", "--tiny", tmp_path, "--out", tmp_path / "eval", monkeypatch=monkeypatch)
    table = (tmp_path / "eval" / "results.md").read_text()
    assert "GILL" in table and "Stable Diffusion" in table and "±" in table
    assert capsys.readouterr().out.count("| CLIP ") == 5  # SD on 2 text settings + GILL on 3
