"""Evaluation answer stores never reuse answers made with other settings: each row folder records the settings
that made its items (model identity, diffusion and generation options) and a rerun with others is refused before
anything is generated, naming the folder and each changed field with its old and new value."""

import hashlib
import json
import os
import shutil

import pytest
import torch
from diffusers import PNDMScheduler
from eval_fixtures import stub_alexnet_weights, write_vist
from PIL import Image

from gill_hf.cli import main
from gill_hf.evaluation import DiffusionSettings, EvaluatedModels
from gill_hf.evaluation import generators
from gill_hf.evaluation.generators import tensors_sha256
from gill_hf.evaluation.image_cache import SETTINGS_NAME, ImageStore, ResponseStore, TextStore

pytestmark = pytest.mark.usefixtures("single_thread")

ITEMS = {ImageStore: Image.new("RGB", (2, 2), "red"), TextStore: "an answer", ResponseStore: ("an answer", None)}


def _files(root) -> dict:
    """Every file under ``root`` -> its bytes."""
    found = {}
    for folder, _, names in os.walk(root):
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                found[os.path.join(folder, name)] = f.read()
    return found


def _error_line(stderr: str) -> str:
    """The command's one error line (progress bars of the model loads come before it); no traceback."""
    assert "Traceback" not in stderr and stderr.endswith("\n")
    errors = [line for line in stderr.splitlines() if "gill-hf: error:" in line]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0]
    return errors[0]


def _counting(store_class, calls: list):
    def make(i, seed):
        calls.append((i, seed))
        return ITEMS[store_class]
    return make


@pytest.mark.parametrize("store_class", list(ITEMS))
def test_same_settings_reuse_and_other_settings_are_refused_unwritten(store_class, tmp_path):
    settings = {"num_inference_steps": 1, "guidance_scale": 7.5, "gill_weights_sha256": "a" * 64}
    store, calls = store_class(tmp_path), []
    store.claim({"gill-row": settings})
    record = tmp_path / store_class.folder / "gill-row" / SETTINGS_NAME
    assert json.loads(record.read_text()) == settings  # recorded before the first item
    store.ensure("gill-row", 0, ["x", "y"], _counting(store_class, calls))
    assert calls == [(0, 0), (1, 0)]

    again = store_class(tmp_path)  # a rerun with the same settings: nothing made
    again.claim({"gill-row": dict(settings)})
    again.ensure("gill-row", 0, ["x", "y"], _counting(store_class, calls))
    assert len(calls) == 2 and (again.num_generated, again.num_reused) == (0, 2)

    before = _files(tmp_path)
    changed = {**settings, "num_inference_steps": 2, "gill_weights_sha256": "b" * 64}
    folder = os.path.join(tmp_path, store_class.folder, "gill-row")
    with pytest.raises(ValueError) as err:
        store_class(tmp_path).claim({"new-row": settings, "gill-row": changed})
    message = str(err.value)
    assert message.startswith(f"{folder} holds answers made with other settings (")
    assert "gill_weights_sha256 aaaaaaaaaaaa... -> bbbbbbbbbbbb..., num_inference_steps 1 -> 2)" in message
    assert "guidance_scale" not in message and f"or delete {folder}" in message and "another --out" in message
    assert _files(tmp_path) == before  # no record for the other row either: every row is checked first


def test_each_changed_or_missing_field_is_named_with_both_values(tmp_path):
    store = ImageStore(tmp_path)
    store.claim({"row": {"max_new_tokens": 4, "stop": "###"}})
    store.ensure("row", 0, ["x"], lambda i, s: ITEMS[ImageStore])
    with pytest.raises(ValueError, match=r"\(max_new_tokens 4 -> 8, prompt_format \(absent\) -> 'plain', "
                                         r"stop '###' -> None\)"):
        ImageStore(tmp_path).claim({"row": {"max_new_tokens": 8, "stop": None, "prompt_format": "plain"}})


def test_a_folder_without_a_record_is_refused(tmp_path):
    legacy = tmp_path / "images" / "gill-row" / "0"
    legacy.mkdir(parents=True)
    Image.new("RGB", (2, 2)).save(legacy / "x.png")  # written before records existed
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=rf"{tmp_path / 'images' / 'gill-row'} holds answers but no {SETTINGS_NAME} "
                                         r"\(written before settings were recorded\), so the settings that made "
                                         r"them are unknown; use another --out"):
        ImageStore(tmp_path).claim({"gill-row": {"num_inference_steps": 1}})
    assert _files(tmp_path) == before
    record = legacy.parent / SETTINGS_NAME
    for damaged, problem in (("{", "is not valid JSON"), ("[1]", r"is not a settings record \(a JSON object\)")):
        record.write_text(damaged)
        with pytest.raises(OSError, match=rf"{record} {problem}.*delete its folder to make its answers again"):
            ImageStore(tmp_path).claim({"gill-row": {"num_inference_steps": 1}})


def test_a_record_without_items_is_replaced_and_unclaimed_rows_are_refused(tmp_path):
    ImageStore(tmp_path).claim({"row": {"guidance_scale": 7.5}})  # a run refused elsewhere before generating
    store = ImageStore(tmp_path)
    store.claim({"row": {"guidance_scale": 3.0}})  # nothing to protect: the record follows the new settings
    assert json.loads((tmp_path / "images" / "row" / SETTINGS_NAME).read_text()) == {"guidance_scale": 3.0}
    (tmp_path / "images" / "row" / ".gill-tmp123").write_bytes(b"")  # a killed write's leftover is no item
    ImageStore(tmp_path).claim({"row": {"guidance_scale": 2.0}})
    with pytest.raises(ValueError, match="row 'other' of .* is not claimed"):
        store.ensure("other", 0, ["x"], lambda i, s: ITEMS[ImageStore])


def test_tensors_sha256_by_hand():
    a, b = torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.tensor(2.5, dtype=torch.bfloat16)
    expected = hashlib.sha256()
    for name, tensor in (("a", a), ("b", b)):
        expected.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        expected.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    assert tensors_sha256([("b", b), ("a", a)]) == expected.hexdigest()  # in name order
    assert tensors_sha256([("a", a.t().contiguous().t()), ("b", b)]) == expected.hexdigest()  # layout-free
    assert tensors_sha256([("a", a + 1e-6), ("b", b)]) != expected.hexdigest()


def test_answer_settings_follow_the_model_and_the_options(make_model, monkeypatch):
    model = make_model()
    models, hashed = EvaluatedModels(model, DiffusionSettings(1, 7.5)), []
    monkeypatch.setattr(generators, "tensors_sha256", lambda named: hashed.append(len(named)) or tensors_sha256(
        named))
    gill, sd, text = models.answer_settings("gill"), models.answer_settings("sd"), models.answer_settings(
        "gill_text", max_new_tokens=4, stop="###", prompt_format="minigpt5")
    assert not any(key.startswith("gill_") for key in sd)  # the baseline stays valid across GILL models
    assert "num_inference_steps" not in text and "diffusion_model" not in text  # texts use no diffusion
    assert (text["max_new_tokens"], text["stop"], text["prompt_format"]) == (4, "###", "minigpt5")
    assert hashed == [len(model.adapter.state_dict()), len(models.sd.unet.state_dict()) + len(
        models.sd.vae.state_dict()) + len(models.sd.text_encoder.state_dict())]  # each model hashed once
    assert gill["gill_weights_sha256"] == tensors_sha256(model.adapter.state_dict().items())  # no LoRA here
    assert {k: gill[k] for k in sd if k != "answers"} == {k: v for k, v in sd.items() if k != "answers"}
    assert (gill["answers"], sd["answers"], gill["image_size"]) == ("gill", "sd", [32, 32])
    assert gill["gill_model"] == "(in memory)" and sd["diffusion_model"] == os.path.abspath(
        model.config.diffusion_model_name_or_path)
    with torch.no_grad():  # trained further in place, the options edited: the same object follows both
        model.adapter.mapper.queries.add_(1e-3)
    models.settings.num_inference_steps, models.settings.guidance_scale = 2, 3.0
    changed = models.answer_settings("gill")
    assert hashed[2:] == [len(model.adapter.state_dict())]  # only the changed model is hashed again
    assert {k for k in gill if gill[k] != changed[k]} == {"gill_weights_sha256", "num_inference_steps",
                                                          "guidance_scale"}
    penalty, model.generation_config.repetition_penalty = model.generation_config.repetition_penalty, 1.3
    assert {k for k in changed if models.answer_settings("gill")[k] != changed[k]} == {"gill_config_sha256"}
    model.generation_config.repetition_penalty = penalty  # saved with the model, it changes greedy answers
    ddim = EvaluatedModels(model, DiffusionSettings(2, 3.0, "ddim"))  # the tiny SD's own scheduler is DDIM
    assert {k for k in gill if ddim.answer_settings("gill")[k] != changed[k]} == {"scheduler"}
    ddim.sd.scheduler = ddim.pipe.scheduler = PNDMScheduler.from_config(ddim.sd.scheduler.config)
    assert {k for k in gill if ddim.answer_settings("gill")[k] != changed[k]} == {"scheduler",
                                                                                   "scheduler_config_sha256"}
    before = models.answer_settings("gill")["gill_weights_sha256"]
    queries = model.adapter.mapper.queries
    queries.data = queries.data + 1.0  # replaced storage, same Parameter and version counter
    assert models.answer_settings("gill")["gill_weights_sha256"] != before
    model.adapter.half()  # a dtype change keeps the Parameter objects
    assert models.answer_settings("gill")["gill_weights_sha256"] == tensors_sha256(model.adapter.state_dict().items())
    with pytest.raises(ValueError, match=r"unknown answer kind 'llm'; choose from \['gill', 'sd', 'gill_text'\]"):
        models.answer_settings("llm")


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_model, tiny_backbones):
    root = tmp_path_factory.mktemp("eval_cache")
    make_model().save_pretrained(str(root / "gill"))
    make_model(seed=1).save_pretrained(str(root / "retrained"))  # same config, other adapter weights
    annotations, image_dir = write_vist(root, num_stories=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch_home"))
        stub_alexnet_weights(str(root / "torch_home"))
        yield {"root": root, "clip": tiny_backbones["clip"], "data": ["--annotations", annotations, "--image-dir",
                                                                       image_dir]}


def test_cli_refuses_other_settings_in_one_line_and_keeps_the_baseline(env, capsys, monkeypatch):
    out = str(env["root"] / "out")

    def argv(model="gill", *extra):  # a model of env["root"], or a path relative to the working directory
        path = os.path.join(env["root"], model) if "/" not in model else model
        return ["eval", "vist", path, "--out", out, *env["data"], "--settings", "1cap",
                "--clip-model", env["clip"], "--steps", "1", *extra]

    def results():
        with open(os.path.join(out, "results.json")) as f:
            return json.load(f)["images"]

    assert main(argv()) == 0 and results() == {"generated": 2, "reused": 0}
    with monkeypatch.context() as mp:  # the same folder named from elsewhere: the same model
        mp.chdir(env["root"] / "vist_images")
        assert main(argv("../gill")) == 0 and results() == {"generated": 0, "reused": 2}
    capsys.readouterr()
    before, made = _files(out), []
    monkeypatch.setattr(EvaluatedModels, "gill", lambda *a: made.append(a))  # nothing may be generated below
    monkeypatch.setattr(EvaluatedModels, "stable_diffusion", lambda *a: made.append(a))
    gill_folder, sd_folder = (os.path.join(out, "images", row) for row in ("gill-1_caption", "sd-1_caption"))
    for extra, changed in ((["--steps", "2"], "num_inference_steps 1 -> 2"),
                           (["--guidance-scale", "3"], "guidance_scale 7.5 -> 3.0")):
        assert main(argv("gill", *extra)) == 1
        err = _error_line(capsys.readouterr().err)
        assert err.startswith(f"gill-hf: error: {sd_folder} holds answers made with other settings ({changed}); "
                              "rerun with those settings")
        assert f"; {gill_folder} holds answers made with other settings ({changed})" in err
    assert main(argv("retrained")) == 1  # other weights: only GILL's folder is refused
    err = _error_line(capsys.readouterr().err)
    assert sd_folder not in err
    assert f"{gill_folder} holds answers made with other settings (gill_model " in err
    assert "gill_weights_sha256 " in err and "gill_config_sha256" not in err
    assert not made and _files(out) == before
    monkeypatch.undo()

    shutil.rmtree(gill_folder)  # as the message says: delete GILL's folder; the baseline is reused
    assert main(argv("retrained")) == 0 and results() == {"generated": 1, "reused": 1}
    assert _files(sd_folder) == {k: v for k, v in before.items() if k.startswith(sd_folder)}

    os.remove(os.path.join(sd_folder, SETTINGS_NAME))  # as a folder written before records existed
    capsys.readouterr()
    assert main(argv("retrained")) == 1
    assert _error_line(capsys.readouterr().err) == (
        f"gill-hf: error: {sd_folder} holds answers but no {SETTINGS_NAME} (written before settings were recorded), "
        f"so the settings that made them are unknown; use another --out (output folder), or delete {sd_folder} to "
        "make them again (run with --debug for the traceback)")
