"""Target layouts of diffusers families other than SD 1.x: detection, targets, conditioning that drives the stock
diffusers pipeline to GILLPipeline's pixels, the latent-diffusion objective, and the layout-mismatch error."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from gill_hf import GILLForConditionalGeneration, GILLPipeline
from gill_hf.diffusion_layouts import DiffusionLayout, layout_of_folder, layout_of_pipeline
from gill_hf.tiny import build_tiny_diffusion
from gill_hf.training import DiffusionTextEncoder, LatentDiffusionLoss

from conftest import SMALL_MAPPER

PROMPT = ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the same dog at the beach."]
LLM = dict(max_new_tokens=14, force_image_after=2, max_images=1, eos_token_id=[])

pytestmark = pytest.mark.usefixtures("single_thread")


def _seed(n=0):
    return torch.Generator().manual_seed(n)


@pytest.fixture(scope="module")
def sd2(tmp_path_factory):
    return build_tiny_diffusion(tmp_path_factory.mktemp("diffusion"), "sd2")


@pytest.fixture(scope="module")
def sd2_model(tiny_backbones, sd2):
    torch.manual_seed(0)
    return GILLForConditionalGeneration.from_backbones(tiny_backbones["opt"], tiny_backbones["clip"], sd2,
                                                       **SMALL_MAPPER).eval()


def test_sd2_layout_is_read_from_the_folder_and_recorded(sd2, sd2_model, tiny_backbones):
    assert layout_of_folder(sd2) == DiffusionLayout("stable_diffusion", 48, "v_prediction")
    assert layout_of_folder(tiny_backbones["sd"]) == DiffusionLayout("stable_diffusion", 32, "epsilon")
    assert (sd2_model.config.diffusion_layout, sd2_model.config.gen_emb_dim) == ("stable_diffusion", 48)
    stock = StableDiffusionPipeline.from_pretrained(sd2, safety_checker=None)
    assert layout_of_pipeline(stock) == layout_of_folder(sd2)


def test_sd2_targets_are_the_stock_pipelines_prompt_embeds(sd2):
    captions = ["a red circle", "a blue square at the top"]
    stock = StableDiffusionPipeline.from_pretrained(sd2, safety_checker=None)
    expected = stock.encode_prompt(captions, "cpu", 1, False)[0]  # (2, 77, 48)
    assert torch.equal(DiffusionTextEncoder(sd2)(captions), expected)


def test_sd2_encode_prompt_drives_the_stock_pipeline_to_the_same_image(sd2_model, sd2):
    pipe = GILLPipeline.from_gill(sd2_model, sd2)
    pipe.set_progress_bar_config(disable=True)
    prompt_embeds, negative = pipe.encode_prompt(PROMPT, **LLM)
    assert prompt_embeds.shape == (1, 77, 48) and negative is None
    full = pipe(PROMPT, generator=_seed(0), num_inference_steps=2, **LLM)
    stock = StableDiffusionPipeline.from_pretrained(sd2, safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    image = stock(prompt_embeds=prompt_embeds, num_inference_steps=2, generator=_seed(0)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(full.images[0]))


def test_sd2_latent_diffusion_loss_regresses_the_velocity(sd2_model, sd2):
    ldm = LatentDiffusionLoss.from_pretrained(sd2)
    cond = torch.randn(2, 77, 48)
    pixels = torch.rand(2, 3, ldm.image_size, ldm.image_size) * 2 - 1
    torch.manual_seed(3)
    loss = ldm(cond, pixels)
    torch.manual_seed(3)  # the same draws, by hand: v = sqrt(a) * noise - sqrt(1 - a) * x0
    x0 = ldm.vae.encode(pixels).latent_dist.sample() * ldm.vae.config.scaling_factor
    noise = torch.randn_like(x0)
    steps = torch.randint(0, ldm.scheduler.config.num_train_timesteps, (2,))
    a = ldm.scheduler.alphas_cumprod[steps].view(-1, 1, 1, 1)
    noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        pred = ldm.unet(noisy, steps, encoder_hidden_states=cond).sample
    velocity = a.sqrt() * noise - (1 - a).sqrt() * x0
    assert loss.item() == pytest.approx(((pred - velocity) ** 2).mean().item(), rel=1e-5)


def test_layout_mismatch_is_an_error_at_construction(make_model, sd2_model, sd2, tiny_backbones):
    with pytest.raises(ValueError, match=r"trained for the stable_diffusion \(L x 32\).*consumes "
                                         r"stable_diffusion \(L x 48\)"):
        GILLPipeline.from_gill(make_model("opt"), sd2)
    sd1 = StableDiffusionPipeline.from_pretrained(tiny_backbones["sd"], safety_checker=None)
    with pytest.raises(ValueError, match=r"stable_diffusion \(L x 48\).*stable_diffusion \(L x 32\)"):
        GILLPipeline(gill_model=sd2_model, processor=sd2_model.processor, unet=sd1.unet, vae=sd1.vae,
                     scheduler=sd1.scheduler)
