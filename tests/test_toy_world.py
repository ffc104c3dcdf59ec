"""The toy world's one home: the split, the probe's scoring, and the shipped backbones that know the world."""

import json

import pytest
import torch
from safetensors.torch import load_file

from gill_hf.cli import main
from gill_hf.toy_world import all_scenes, scene_caption, split_scenes
from gill_hf.toy_world import backbones as toy
from gill_hf.toy_world.probe import ATTRIBUTES, chance_correctness, correctness


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """Loadable folders written from the fp16 weights shipped in the package."""
    return toy.toy_backbones(tmp_path_factory.mktemp("toy-backbones"))


def test_shipped_backbones_pass_their_own_quality_checks(shipped, single_thread):
    checks = toy.quality_checks(shipped)
    assert checks["passed"], json.dumps({k: v for k, v in checks.items() if k != "llm_samples"})
    assert checks["probe_on_rendered"]["scene"] == 1.0
    for drawn in (checks["diffusion_from_caption"], checks["diffusion_from_story_step"]):
        assert drawn["position"] >= 0.9 and drawn["scene"] >= toy.MIN_SCENE_ACCURACY > 20 * checks["chance"]["scene"]
    assert checks["llm_grammatical_continuations"] >= 0.9 and checks["llm_continues_the_story"] >= 0.9


def test_shipped_files_are_small_fp16_and_load_into_stock_classes(shipped):
    from diffusers import StableDiffusionPipeline
    from transformers import AutoModelForCausalLM

    total = 0
    for name in toy.WEIGHT_FILES:
        path = toy.WEIGHTS_DIR / f"{name}.safetensors"
        total += path.stat().st_size
        assert {t.dtype for t in load_file(path).values()} == {torch.float16}, name
    assert total < 4 * 2**20
    pipe = StableDiffusionPipeline.from_pretrained(shipped["sd"])
    assert (pipe.unet.config.sample_size * pipe.vae_scale_factor, pipe.text_encoder.config.hidden_size) == (32, 32)
    llm = AutoModelForCausalLM.from_pretrained(shipped["llm"])
    shipped_llm = load_file(toy.WEIGHTS_DIR / "llm.safetensors")
    assert all(torch.equal(llm.state_dict()[k], v.float()) for k, v in shipped_llm.items())


def test_toy_backbones_names_missing_weight_files(tmp_path):
    (tmp_path / "weights").mkdir()
    with pytest.raises(FileNotFoundError, match=r"lacks the toy backbone weights \['llm.safetensors'"):
        toy.toy_backbones(tmp_path / "out", tmp_path / "weights")
    assert not (tmp_path / "out").exists()


def test_split_holds_scenes_out_of_training():
    split = split_scenes(eval_size=10, train_size=200, then_prob=0.5, num_stories=3, story_length=3, seed=4)
    assert len(set(split.heldout_scenes)) == 10 and not set(split.heldout_scenes) & set(split.train_scenes)
    assert [c.removeprefix("then ") for c in split.train_captions] == [scene_caption(s) for s in split.train_scenes]
    assert 50 < sum(c.startswith("then ") for c in split.train_captions) < 150
    assert all(scene in split.heldout_scenes for story in split.stories for _, _, scene in story)
    again = split_scenes(eval_size=10, train_size=200, then_prob=0.5, num_stories=3, story_length=3, seed=4)
    assert again.heldout_scenes == split.heldout_scenes and again.train_captions == split.train_captions


def test_llm_stories_follow_from_their_last_step():
    """Each step of the LLM's corpus is the last one moved to the next place, or recoloured, or reshaped in place
    (so the next sentence depends on the context); moves are the likeliest (60%)."""
    by_caption = {scene_caption(scene): scene for scene in all_scenes()}
    steps = [[by_caption.get(text) for text in story.split(" then ")] for story in toy.story_corpus(2000, seed=1)]
    pairs = [(a, b) for story in steps for a, b in zip(story, story[1:]) if a is not None]
    assert len(pairs) > 2000 and all(b is not None for _, b in pairs)
    moves = [b == toy.moved(a) for a, b in pairs]
    assert all(move or (a[2] == b[2] and sum(x != y for x, y in zip(a, b)) == 1)
               for (a, b), move in zip(pairs, moves))
    assert sum(moves) / len(pairs) == pytest.approx(0.6, abs=0.03)
    assert toy.moved(("red", "circle", "bottom")) == ("red", "circle", "left")


def test_correctness_counts_attributes_and_whole_scenes():
    scenes = all_scenes()[:4]
    readings = [scenes[0], (scenes[1][0], "square" if scenes[1][1] != "square" else "circle", scenes[1][2]),
                ("blue" if scenes[2][0] != "blue" else "red", *scenes[2][1:]), scenes[3]]
    assert correctness(readings, scenes) == {"colour": 3 / 4, "shape": 3 / 4, "position": 1.0, "scene": 2 / 4}
    chance = chance_correctness()
    assert chance["scene"] == pytest.approx(chance["colour"] * chance["shape"] * chance["position"]) == 1 / 72
    assert set(chance) == {*ATTRIBUTES, "scene"}


def test_pretraining_writes_weights_folders_and_checks(tmp_path, single_thread, monkeypatch):
    """A two-step run of every training: the files it writes round-trip, and its (failing) checks are recorded."""
    settings = toy.PretrainSettings(llm_steps=2, vae_steps=2, diffusion_steps=2, probe_steps=2, batch_size=4)
    record = toy.pretrain_toy_backbones(tmp_path, settings)
    assert record["checks"]["passed"] is False and set(record["timings_s"]) == {"llm", "vae", "diffusion", "probe"}
    assert json.loads((tmp_path / "checks.json").read_text())["settings"]["diffusion_steps"] == 2
    unet = load_file(tmp_path / "weights" / "unet.safetensors")
    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(tmp_path / "sd", subfolder="unet")
    assert all(torch.equal(loaded.state_dict()[k], v.float()) for k, v in unet.items())
    with pytest.raises(ValueError, match="diffusion_steps must be >= 1"):
        toy.PretrainSettings(diffusion_steps=0)
    seen = {}
    monkeypatch.setattr(toy, "pretrain_toy_backbones", lambda out, s: seen.update(out=out, seed=s.seed) or record)
    assert main(["tiny-backbones", "--pretrained", str(tmp_path / "cli"), "--seed", "3"]) == 1  # checks failed
    assert seen == {"out": str(tmp_path / "cli"), "seed": 3}
