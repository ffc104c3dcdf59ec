"""Remote code: pushed repos load with ``trust_remote_code=True`` in a process where gill_hf cannot be imported
(AutoConfig / AutoModel / AutoModelForImageTextToText / AutoProcessor, diffusers' DiffusionPipeline) and give the
installed library's text and image; the pushed modules are the installed files; generic diffusers loading of a saved
pipeline; the card's install and loading lines; a backbone remote loading cannot rebuild is refused at push time."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import AutoPipelineForText2Image, DiffusionPipeline
from huggingface_hub import ModelCard
from no_gill import BLOCK_GILL
from PIL import Image

from gill_hf import GILLPipeline
from gill_hf.remote_code import ENTRY_MODULE, ENTRY_TEMPLATE, MODEL_ENTRY_MODULES, PIPELINE_ENTRY_MODULES, \
    remote_code_files

PROMPT = ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the same dog at the beach."]
TEXT_KWARGS = dict(max_new_tokens=6, do_sample=False, eos_token_id=[])
PIPE_KWARGS = dict(max_new_tokens=10, force_image_after=2, max_images=1, eos_token_id=[], num_inference_steps=2,
                   decision="generate", output_type="np")

# Run in a fresh interpreter: gill_hf is blocked on the import path, the Hub is the loopback fake.
CHILD = BLOCK_GILL + textwrap.dedent("""
    import json
    import numpy as np, safetensors.numpy, torch
    from diffusers import DiffusionPipeline
    from PIL import Image
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

    model_repo, pipe_repo, out = sys.argv[1:4]
    text_kwargs, pipe_kwargs = json.loads(sys.argv[4]), json.loads(sys.argv[5])
    try:
        import gill_hf  # noqa: F401
        raise SystemExit("gill_hf is importable")
    except ImportError:
        pass
    prompt = ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the same dog at the beach."]
    config = AutoConfig.from_pretrained(model_repo, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(model_repo, trust_remote_code=True)
    bare = AutoModel.from_pretrained(model_repo, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(model_repo, trust_remote_code=True)
    generated = model.generate(**processor(prompt, padding_side="left"), **text_kwargs)
    pipe = DiffusionPipeline.from_pretrained(pipe_repo, revision="v1", trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    answer = pipe(prompt, generator=torch.Generator().manual_seed(0), **pipe_kwargs)
    safetensors.numpy.save_file({"sequences": generated.numpy(), "image": np.ascontiguousarray(answer.images[0]),
                                 "pipe_sequences": answer.generation.sequences.numpy()}, out)
    assert type(pipe.gill_model) is type(pipe).__init__.__annotations__["gill_model"]  # one copy of each class
    classes = [type(o) for o in (config, model, bare, processor, pipe, pipe.gill_model, pipe.processor)]
    print(json.dumps([f"{c.__module__}.{c.__name__}" for c in classes]))
""")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def pushed(fake_hub, make_model):
    model = make_model("opt", seed=4).eval()
    with torch.no_grad():
        for param in model.adapter.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    pipe = GILLPipeline.from_gill(model)
    pipe.set_progress_bar_config(disable=True)
    model.push_to_hub("alice/gill-remote")
    pipe.push_to_hub("alice/gill-remote-pipe", revision="v1")
    return model, pipe


def _child_env(tmp_path, hub) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=hub.token, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "home"),
               HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_DISABLE_TELEMETRY="1",
               TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    return env


def test_pushed_repos_load_without_gill_hf_and_match_the_library(pushed, fake_hub, tmp_path):
    model, pipe = pushed
    out = tmp_path / "child.safetensors"
    result = subprocess.run([sys.executable, "-c", CHILD, "alice/gill-remote", "alice/gill-remote-pipe", str(out),
                             json.dumps(TEXT_KWARGS), json.dumps(PIPE_KWARGS)], env=_child_env(tmp_path, fake_hub),
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Do you wish to run the custom code" not in result.stdout  # trust_remote_code was asked once, not again
    classes = json.loads(result.stdout.strip().splitlines()[-1])
    assert all(c.startswith("transformers_modules.alice.") for c in classes), classes  # the repo's code ran
    assert classes[1].endswith("modeling_gill.GILLForConditionalGeneration") and classes[3].endswith("GILLProcessor")
    assert classes[4].endswith("pipeline_gill.GILLPipeline")
    theirs = safetensors.numpy.load_file(str(out))

    ours = model.generate(**model.processor(PROMPT, padding_side="left"), **TEXT_KWARGS)
    np.testing.assert_array_equal(theirs["sequences"], ours.numpy())
    answer = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **PIPE_KWARGS)
    np.testing.assert_array_equal(theirs["pipe_sequences"], answer.generation.sequences.numpy())
    assert answer.images and theirs["image"].shape == np.asarray(answer.images[0]).shape
    np.testing.assert_allclose(theirs["image"], np.asarray(answer.images[0]), atol=1e-5)


def test_pushed_modules_are_the_installed_files(pushed, fake_hub):
    model_files = fake_hub.repos["alice/gill-remote"].files()
    expected = remote_code_files(MODEL_ENTRY_MODULES)
    assert {"configuration_gill.py", "modeling_gill.py", "processing_gill.py", "generation_gill.py"} <= set(expected)
    assert {p for p in model_files if p.endswith(".py")} == set(expected)
    for name, path in expected.items():
        assert model_files[name] == path.read_bytes(), name
    config = json.loads(model_files["config.json"])
    assert config["auto_map"] == {"AutoConfig": "configuration_gill.GILLConfig",
                                  "AutoModel": "modeling_gill.GILLForConditionalGeneration",
                                  "AutoModelForImageTextToText": "modeling_gill.GILLForConditionalGeneration"}
    assert json.loads(model_files["processor_config.json"])["auto_map"] == {
        "AutoProcessor": "processing_gill.GILLProcessor"}

    pipe_files = fake_hub.repos["alice/gill-remote-pipe"].files("v1")
    expected = remote_code_files(PIPELINE_ENTRY_MODULES)
    entries = {f"{ENTRY_MODULE}.py", f"gill_model/{ENTRY_MODULE}.py", f"processor/{ENTRY_MODULE}.py"}
    assert {p for p in pipe_files if p.endswith(".py")} == set(expected) | entries
    for name, path in expected.items():
        assert pipe_files[name] == path.read_bytes(), name
    entry = ENTRY_TEMPLATE.format(repo_id="alice/gill-remote-pipe", revision="v1").encode()
    assert all(pipe_files[name] == entry for name in entries)
    index = json.loads(pipe_files["model_index.json"])
    assert index["_class_name"] == [ENTRY_MODULE, "GILLPipeline"]
    assert index["gill_model"] == [ENTRY_MODULE, "GILLForConditionalGeneration"]
    assert index["processor"] == [ENTRY_MODULE, "GILLProcessor"]
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]


def test_installed_library_loads_the_remote_code_pipeline_without_running_it(pushed):
    model, _ = pushed
    loaded = GILLPipeline.from_pretrained("alice/gill-remote-pipe", revision="v1")
    assert type(loaded) is GILLPipeline and type(loaded.gill_model) is type(model)
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(loaded.gill_model.adapter_state_dict()[key], value), key


def test_generic_diffusers_loading_of_a_saved_pipeline(pushed, tmp_path):
    model, pipe = pushed
    pipe.save_pretrained(tmp_path / "saved")
    for loader in (DiffusionPipeline, AutoPipelineForText2Image):
        loaded = loader.from_pretrained(tmp_path / "saved")
        assert type(loaded) is GILLPipeline and type(loaded.gill_model) is type(model), loader
        for key, value in model.adapter_state_dict().items():
            assert torch.equal(loaded.gill_model.adapter_state_dict()[key], value), key
    assert torch.equal(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight)


def test_model_card_install_line_both_ways_and_license_name(pushed, fake_hub):
    card = ModelCard(fake_hub.repos["alice/gill-remote"].files()["README.md"].decode())
    assert "pip install gill_hf" in card.text
    assert 'GILLForConditionalGeneration.from_pretrained("alice/gill-remote")' in card.text
    assert 'AutoModelForImageTextToText.from_pretrained("alice/gill-remote", trust_remote_code=True)' in card.text
    assert card.data.license == "other" and card.data.license_name == "backbone-licenses"
    pipe_card = ModelCard(fake_hub.repos["alice/gill-remote-pipe"].files("v1")["README.md"].decode())
    assert 'DiffusionPipeline.from_pretrained("alice/gill-remote-pipe", revision="v1", trust_remote_code=True)' \
        in pipe_card.text
    assert 'GILLPipeline.from_pretrained("alice/gill-remote-pipe", revision="v1")' in pipe_card.text


def test_remote_code_off_and_license_name_checks(pushed, fake_hub):
    model, _ = pushed
    model.push_to_hub("alice/gill-no-code", remote_code=False, license="apache-2.0")
    files = fake_hub.repos["alice/gill-no-code"].files()
    assert not [p for p in files if p.endswith(".py")] and "auto_map" not in json.loads(files["config.json"])
    card = ModelCard(files["README.md"].decode())
    assert "trust_remote_code" not in card.text and card.data.license_name is None
    with pytest.raises(ValueError, match="license_name='mine' only applies with license='other'"):
        model.push_to_hub("alice/gill-bad-license", license="mit", license_name="mine")
    assert "alice/gill-bad-license" not in fake_hub.repos


def test_backbone_remote_loading_cannot_rebuild_is_refused_at_push_time(pushed, fake_hub):
    model, _ = pushed
    llm_class = type(model.language_model)
    model.language_model.__class__ = type("LocalCustomLM", (llm_class,), {})  # defined here, not in transformers
    try:
        with pytest.raises(ValueError, match=r"cannot rebuild the language model: test_remote_code\.LocalCustomLM"):
            model.push_to_hub("alice/gill-custom-llm")
    finally:
        model.language_model.__class__ = llm_class
    assert "alice/gill-custom-llm" not in fake_hub.repos  # refused before the repo was created
    model.push_to_hub("alice/gill-custom-llm", remote_code=False)  # the library itself can still load it


def test_lora_pipeline_remote_code_is_refused_at_push_time(pushed, fake_hub):
    _, pipe = pushed
    pipe.gill_model.config.use_lora = True  # diffusers would drop gill_model/lora/adapter_config.json
    try:
        with pytest.raises(ValueError, match="LoRA-tuned LLM is not supported"):
            pipe.push_to_hub("alice/gill-lora-pipe")
    finally:
        pipe.gill_model.config.use_lora = False
    assert "alice/gill-lora-pipe" not in fake_hub.repos
