import os

import safetensors.torch
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, CLIPVisionModel

from gill_hf.cli import main


def test_tiny_backbones_load_through_the_real_loaders(tiny_backbones):
    opt = AutoModelForCausalLM.from_pretrained(tiny_backbones["opt"])
    llama = AutoModelForCausalLM.from_pretrained(tiny_backbones["llama"])
    assert opt.config.model_type == "opt" and opt.config.tie_word_embeddings
    assert llama.config.model_type == "llama" and not llama.config.tie_word_embeddings
    assert opt.get_output_embeddings().weight.data_ptr() == opt.get_input_embeddings().weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(tiny_backbones["opt"])
    assert tok.decode(tok("any text, even ünïcode")["input_ids"], skip_special_tokens=True) == "any text, even ünïcode"
    assert CLIPVisionModel.from_pretrained(tiny_backbones["clip"]).config.image_size == 32
    assert AutoConfig.from_pretrained(tiny_backbones["sd"], subfolder="text_encoder").hidden_size == 32


def test_tiny_stable_diffusion_runs(tiny_backbones):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_backbones["sd"])
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 32, 32, 3)


def test_cli_writes_identical_backbones(tmp_path, tiny_backbones, capsys):
    assert main(["tiny-backbones", str(tmp_path / "again")]) == 0
    assert '"opt"' in capsys.readouterr().out
    for name in ("opt", "llama", "clip"):
        first = safetensors.torch.load_file(os.path.join(tiny_backbones[name], "model.safetensors"))
        second = safetensors.torch.load_file(tmp_path / "again" / name / "model.safetensors")
        assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_cli_counts_paper_parameters(capsys):
    assert main(["count-params"]) == 0
    assert "50,104,579" in capsys.readouterr().out
