"""SD3 and Flux target layouts: detection, targets equal to the stock ``encode_prompt``, conditioning that drives
the stock ``StableDiffusion3Pipeline`` / ``FluxPipeline`` to GILLPipeline's pixels, the flow-matching objective,
save/load, the precompute CLI and the layout-mismatch error."""

import asyncio
import copy

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from huggingface_hub.errors import StrictDataclassError
from PIL import Image

from gill_hf import GILLConfig, GILLPipeline
from gill_hf.diffusion_layouts import DiffusionLayout, layout_of_folder, layout_of_pipeline
from gill_hf.training import DiffusionTextEncoder, LatentDiffusionLoss, TargetStore

from conftest import gill_on, seeded

PROMPT = ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the same dog at the beach."]
LLM = dict(max_new_tokens=14, force_image_after=2, max_images=1, eos_token_id=[])
DIFFUSION = dict(num_inference_steps=2, height=32, width=32)
CAPTIONS = ["a red circle", "a blue square at the top"]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sd3(tiny_diffusion):
    return tiny_diffusion["sd3"]


@pytest.fixture(scope="module")
def flux(tiny_diffusion):
    return tiny_diffusion["flux"]


@pytest.fixture(scope="module")
def sd3_model(tiny_backbones, sd3):
    return gill_on(tiny_backbones, sd3)


@pytest.fixture(scope="module")
def flux_model(tiny_backbones, flux):
    return gill_on(tiny_backbones, flux)


def test_layouts_are_read_from_the_folders_and_recorded(sd3, flux, sd3_model, flux_model):
    assert layout_of_folder(sd3) == DiffusionLayout("sd3", 96, 64, "flow_matching")
    assert layout_of_folder(flux) == DiffusionLayout("flux", 48, 32, "flow_matching")
    assert layout_of_pipeline(StableDiffusion3Pipeline.from_pretrained(sd3)) == layout_of_folder(sd3)
    for model, expected in ((sd3_model, ("sd3", 77 + 256, 96, 64)), (flux_model, ("flux", 512, 48, 32))):
        config = model.config
        assert (config.diffusion_layout, config.num_gen_queries, config.gen_emb_dim, config.gen_pooled_dim) == expected
    with pytest.raises(StrictDataclassError, match="positive width for diffusion_layout='sdxl', 'sd3' or 'flux'"):
        GILLConfig(diffusion_layout="flux", gen_emb_dim=48)


def test_targets_are_the_stock_pipelines_embeds(sd3, flux):
    with torch.no_grad():  # as the stock pipelines run it (SDPA under autograd takes another kernel)
        stock = StableDiffusion3Pipeline.from_pretrained(sd3)
        sd3_stock = stock.encode_prompt(CAPTIONS, None, None, device="cpu", do_classifier_free_guidance=False)
        sd3_null = stock.encode_prompt("", None, None, device="cpu", do_classifier_free_guidance=False)
        flux_stock = FluxPipeline.from_pretrained(flux).encode_prompt(CAPTIONS, None, device="cpu")
    embeds, _, pooled, _ = sd3_stock
    assert embeds.shape == (2, 333, 96) and pooled.shape == (2, 64)
    assert torch.count_nonzero(embeds[:, :77, 64:]) == 0  # CLIP-L ++ CLIP-G (64) zero-padded to T5's 96
    encoder = DiffusionTextEncoder(sd3)
    got_embeds, got_pooled = encoder(CAPTIONS)
    assert torch.equal(got_embeds, embeds) and torch.equal(got_pooled, pooled)
    null_embeds, null_pooled = encoder([""])
    assert torch.equal(null_embeds, sd3_null[0]) and torch.equal(null_pooled, sd3_null[2])  # the CFG target
    got_embeds, got_pooled = DiffusionTextEncoder(flux)(CAPTIONS)
    assert got_embeds.shape == (2, 512, 48) and got_pooled.shape == (2, 32)
    assert torch.equal(got_embeds, flux_stock[0]) and torch.equal(got_pooled, flux_stock[1])


@pytest.mark.parametrize("cfg_dropout_prob", [0.0, 0.1])
def test_sd3_encode_prompt_drives_the_stock_pipeline_to_the_same_image(tiny_backbones, sd3, cfg_dropout_prob):
    model = gill_on(tiny_backbones, sd3, cfg_dropout_prob=cfg_dropout_prob)
    pipe = GILLPipeline.from_gill(model, sd3)
    pipe.set_progress_bar_config(disable=True)
    kwargs = pipe.encode_prompt(PROMPT, return_dict=True, **LLM)
    assert list(kwargs) == ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                            "negative_pooled_prompt_embeds"]
    assert kwargs["prompt_embeds"].shape == (1, 333, 96) and kwargs["pooled_prompt_embeds"].shape == (1, 64)
    assert (kwargs["negative_prompt_embeds"] is None) == (cfg_dropout_prob == 0)
    full = pipe(PROMPT, generator=seeded(0), output_type="np", **DIFFUSION, **LLM)
    stock = StableDiffusion3Pipeline.from_pretrained(sd3)  # embeds "" for a missing negative, as GILLPipeline's
    stock.set_progress_bar_config(disable=True)
    image = stock(**kwargs, generator=seeded(0), output_type="np", **DIFFUSION).images[0]
    assert np.array_equal(image, full.images[0])
    assert stock.guidance_scale == 7.0  # the family default both used


def test_flux_encode_prompt_drives_the_stock_pipeline_to_the_same_image(flux_model, flux):
    pipe = GILLPipeline.from_gill(flux_model, flux)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None  # no CFG: no empty prompt to embed
    embeds, pooled = pipe.encode_prompt(PROMPT, **LLM)
    assert embeds.shape == (1, 512, 48) and pooled.shape == (1, 32)
    assert torch.equal(pooled, flux_model.adapter.pooled_head.proj(embeds.mean(1)))
    full = pipe(PROMPT, generator=seeded(0), output_type="np", **DIFFUSION, **LLM)
    stock = FluxPipeline.from_pretrained(flux)
    stock.set_progress_bar_config(disable=True)
    image = stock(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=seeded(0), output_type="np",
                  **DIFFUSION).images[0]
    assert np.array_equal(image, full.images[0])
    other = stock(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=seeded(0), output_type="np",
                  guidance_scale=1.0, **DIFFUSION).images[0]
    assert not np.array_equal(other, image)  # the embedded guidance (3.5 by default) reaches the transformer
    direct = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=seeded(0), output_type="np",
                  guidance_scale=1.0, **DIFFUSION)
    assert np.array_equal(direct.images[0], other)
    with pytest.raises(ValueError, match="no classifier-free guidance: negative_prompt_embeds"):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, negative_prompt_embeds=embeds, **DIFFUSION)
    with pytest.raises(ValueError, match="height must be a positive multiple of 4, got 34"):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=1, height=34)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(N, L, 48\) for the flux"):
        pipe(prompt_embeds=embeds[..., :32], pooled_prompt_embeds=pooled, **DIFFUSION)


def test_a_flux_transformer_without_guidance_embedding_refuses_guidance_scale(flux_model, flux, monkeypatch):
    """FLUX.1-schnell has no guidance embedding: an explicit guidance_scale would be silently dropped, so it is
    refused; None runs as the stock pipeline does. The web demo's panel holds a hidden None there instead of a
    slider, and passes an API caller's value on (refused)."""
    from diffusers import FluxTransformer2DModel

    from gill_hf.demo.web import DemoSettings

    pipe = GILLPipeline.from_gill(flux_model, flux)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.guidance_applies
    assert DemoSettings(guidance_scale=2.0).pipeline_kwargs(pipe)["guidance_scale"] == 2.0
    config = dict(FluxTransformer2DModel.load_config(flux, subfolder="transformer"), guidance_embeds=False)
    with torch.random.fork_rng():
        torch.manual_seed(1)
        schnell = FluxTransformer2DModel.from_config(config)
    pipe.register_modules(transformer=schnell)
    assert not pipe.guidance_applies
    embeds, pooled = pipe.encode_prompt(PROMPT, **LLM)
    with pytest.raises(ValueError, match="guidance_scale=1.0 does not apply: .*no guidance embedding"):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, guidance_scale=1.0, **DIFFUSION)
    image = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=seeded(0), output_type="np",
                 **DIFFUSION).images[0]
    stock = FluxPipeline.from_pretrained(flux, transformer=schnell)
    stock.set_progress_bar_config(disable=True)
    assert np.array_equal(image, stock(prompt_embeds=embeds, pooled_prompt_embeds=pooled, generator=seeded(0),
                                       output_type="np", **DIFFUSION).images[0])
    assert DemoSettings().pipeline_kwargs(pipe)["guidance_scale"] is None  # the hidden control's value
    import gradio as gr

    from gill_hf.demo.web import build_demo

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")

    async def build():  # inside a running loop: gradio makes (and never closes) one per lock otherwise
        return build_demo(pipe)

    control = next(block for block in asyncio.run(build()).blocks.values()
                   if getattr(block, "label", None) == "Guidance scale")
    assert isinstance(control, gr.Number) and not control.visible and control.value is None
    assert control.preprocess(None) is None  # what the handlers receive from it
    explicit = DemoSettings(guidance_scale=2.0, num_inference_steps=2).pipeline_kwargs(pipe)
    with pytest.raises(ValueError, match="does not apply"):  # an /answer caller's explicit value is refused too
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, height=32, width=32,
             **{k: v for k, v in explicit.items() if k in ("guidance_scale", "num_inference_steps")})


def _latents(ldm, pixels):
    """The VAE's latents as SD3 / Flux training uses them: (sample - shift_factor) * scaling_factor."""
    config = ldm.vae.config
    return (ldm.vae.encode(pixels).latent_dist.sample() - config.shift_factor) * config.scaling_factor


def test_sd3_flow_matching_loss_regresses_the_velocity_at_logit_normal_times(sd3):
    ldm = LatentDiffusionLoss.from_pretrained(sd3)
    cond, pooled = torch.randn(2, 333, 96), torch.randn(2, 64)
    pixels = torch.rand(2, 3, ldm.image_size, ldm.image_size) * 2 - 1
    with pytest.raises(ValueError, match=r"sd3 \(L x 96 \+ pooled 64\) denoiser needs the pooled vector"):
        ldm(cond, pixels)
    with pytest.raises(ValueError, match="snr_gamma .* is trained by flow matching"):
        LatentDiffusionLoss(ldm.unet, ldm.vae, ldm.scheduler, snr_gamma=5.0)
    torch.manual_seed(3)
    loss = ldm(cond, pixels, pooled)
    torch.manual_seed(3)  # the same draws, by hand
    x0 = _latents(ldm, pixels)
    noise = torch.randn_like(x0)
    index = (torch.sigmoid(torch.randn(2)) * 1000).long()  # logit-normal(0, 1) over the 1000 training steps
    s = (1000 - index.double()) / 1000
    sigma = (3 * s / (1 + 2 * s)).float().view(-1, 1, 1, 1)  # SD3's static shift 3
    with torch.no_grad():
        pred = ldm.unet(hidden_states=(1 - sigma) * x0 + sigma * noise, timestep=sigma.flatten() * 1000,
                        encoder_hidden_states=cond, pooled_projections=pooled).sample
    assert loss.item() == pytest.approx(((pred - (noise - x0)) ** 2).mean().item(), rel=1e-5)
    used = copy.deepcopy(ldm.scheduler)
    used.set_timesteps(2)  # a scheduler an inference run left behind: the loss still draws from the training schedule
    torch.manual_seed(3)
    assert LatentDiffusionLoss(ldm.unet, ldm.vae, used)(cond, pixels, pooled).item() == loss.item()


def test_flux_flow_matching_loss_packs_latents_and_embeds_the_guidance(flux):
    ldm = LatentDiffusionLoss.from_pretrained(flux)
    cond, pooled = torch.randn(2, 512, 48), torch.randn(2, 32)
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.manual_seed(3)
    loss = ldm(cond, pixels, pooled)
    torch.manual_seed(3)
    x0 = _latents(ldm, pixels)  # (2, 16, 16, 16)
    noise = torch.randn_like(x0)
    sigma = ((1000 - (torch.rand(2) * 1000).long()) / 1000).view(-1, 1, 1, 1)  # uniform, unshifted in training

    def pack(x):  # 2 x 2 patches -> tokens (N, 8 * 8, 16 * 4), channels first within a token
        return x.view(2, 16, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(2, 64, 64)

    rows, cols = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    image_ids = torch.stack([torch.zeros(64), rows.flatten(), cols.flatten()], dim=-1)
    with torch.no_grad():
        pred = ldm.unet(hidden_states=pack((1 - sigma) * x0 + sigma * noise), timestep=sigma.flatten(),
                        guidance=torch.full((2,), 3.5), pooled_projections=pooled, encoder_hidden_states=cond,
                        txt_ids=torch.zeros(512, 3), img_ids=image_ids).sample
    assert loss.item() == pytest.approx(((pred - pack(noise - x0)) ** 2).mean().item(), rel=1e-5)


def test_sd3_pipeline_round_trips_and_the_cli_precomputes_its_targets(sd3_model, sd3, tmp_path):
    from gill_hf.cli import main

    pipe = GILLPipeline.from_gill(sd3_model, sd3)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder_3 is not None  # no mapped null: the T5 and both CLIPs embed the empty negative
    cond = dict(prompt_embeds=torch.randn(1, 333, 96), pooled_prompt_embeds=torch.randn(1, 64), output_type="np",
                **DIFFUSION)
    before = pipe(**cond, generator=seeded(0)).images[0]
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = GILLPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert loaded.unet is None and type(loaded.transformer).__name__ == "SD3Transformer2DModel"
    assert (loaded.gill_model.config.diffusion_layout, loaded.gill_model.config.gen_pooled_dim) == ("sd3", 64)
    assert np.array_equal(loaded(**cond, generator=seeded(0)).images[0], before)
    loaded.text_encoder_3 = None
    with pytest.raises(ValueError, match=r"lacks \['text_encoder_3'\] to embed the empty prompt"):
        loaded(**cond)
    tsv = tmp_path / "c.tsv"
    tsv.write_text("caption\timage\na red circle\tx.png\na star\ty.png\n")
    assert main(["precompute-targets", str(tsv), str(tmp_path / "t"), "--diffusion-model", sd3,
                 "--dtype", "float32"]) == 0
    store = TargetStore(tmp_path / "t")
    assert store.shape == (333, 96) and store.pooled_dim == 64
    embeds, pooled = DiffusionTextEncoder(sd3)(["a red circle", "a star"])
    assert torch.equal(store[1], embeds[1]) and torch.equal(store.pooled(1), pooled[1])


def test_layout_mismatch_is_an_error_at_construction(sd3_model, flux, sd3, make_model):
    with pytest.raises(ValueError, match=r"trained for the sd3 \(L x 96 \+ pooled 64\) target layout but the "
                                         r"diffusion model consumes flux \(L x 48 \+ pooled 32\)"):
        GILLPipeline.from_gill(sd3_model, flux)
    with pytest.raises(ValueError, match=r"trained for the stable_diffusion \(L x 32\).*consumes "
                                         r"sd3 \(L x 96 \+ pooled 64\)"):
        GILLPipeline.from_gill(make_model("opt"), sd3)


def test_sd3_empty_negative_is_as_long_as_a_shorter_sequence(tiny_backbones, sd3):
    model = gill_on(tiny_backbones, sd3, num_gen_queries=77 + 16)  # L: CLIP's 77, then 16 T5 tokens
    pipe = GILLPipeline.from_gill(model, sd3)
    pipe.set_progress_bar_config(disable=True)
    cond = dict(prompt_embeds=torch.randn(1, 93, 96), pooled_prompt_embeds=torch.randn(1, 64), output_type="np",
                **DIFFUSION)
    stock = StableDiffusion3Pipeline.from_pretrained(sd3)
    stock.set_progress_bar_config(disable=True)
    expected = stock(**cond, max_sequence_length=16, generator=seeded(0)).images[0]
    assert np.array_equal(pipe(**cond, generator=seeded(0)).images[0], expected)


def test_flux_pipeline_round_trips_and_the_cli_precomputes_its_targets(flux_model, flux, tmp_path, monkeypatch):
    from transformers import CLIPTextModel, T5EncoderModel

    from gill_hf.cli import main

    with monkeypatch.context() as patch:  # no CFG, so no empty negative: its text encoders are not even loaded
        for encoder in (CLIPTextModel, T5EncoderModel):
            patch.setattr(encoder, "from_pretrained", lambda *a, **k: pytest.fail("a text encoder was loaded"))
        pipe = GILLPipeline.from_gill(flux_model, flux)
    pipe.set_progress_bar_config(disable=True)
    cond = dict(prompt_embeds=torch.randn(1, 512, 48), pooled_prompt_embeds=torch.randn(1, 32), output_type="np",
                **DIFFUSION)
    before = pipe(**cond, generator=seeded(0)).images[0]
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = GILLPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.transformer).__name__ == "FluxTransformer2DModel" and loaded.text_encoder is None
    assert np.array_equal(loaded(**cond, generator=seeded(0)).images[0], before)
    tsv = tmp_path / "c.tsv"
    tsv.write_text("caption\timage\na red circle\tx.png\na star\ty.png\n")
    assert main(["precompute-targets", str(tsv), str(tmp_path / "t"), "--diffusion-model", flux,
                 "--dtype", "float32"]) == 0
    store = TargetStore(tmp_path / "t")
    embeds, pooled = DiffusionTextEncoder(flux)(["a red circle", "a star"])
    assert store.shape == (512, 48) and torch.equal(store[0], embeds[0]) and torch.equal(store.pooled(0), pooled[0])
