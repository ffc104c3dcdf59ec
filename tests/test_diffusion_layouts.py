"""Target layouts of diffusers families other than SD 1.x: detection, targets, conditioning that drives the stock
diffusers pipeline to GILLPipeline's pixels, the latent-diffusion objective, and the layout-mismatch error."""

import json

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from huggingface_hub.errors import StrictDataclassError
from PIL import Image

from gill_hf import GILLConfig, GILLForConditionalGeneration, GILLPipeline
from gill_hf.diffusion_layouts import DiffusionLayout, layout_of_folder, layout_of_pipeline
from gill_hf.training import (DiffusionTextEncoder, GILLDataCollator, LatentDiffusionLoss, TargetStore,
                              precompute_targets)

from conftest import SMALL_MAPPER, gill_on, seeded

PROMPT = ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the same dog at the beach."]
LLM = dict(max_new_tokens=14, force_image_after=2, max_images=1, eos_token_id=[])

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def sd2(tiny_diffusion):
    return tiny_diffusion["sd2"]


@pytest.fixture(scope="module")
def sd2_model(tiny_backbones, sd2):
    return gill_on(tiny_backbones, sd2)


def test_sd2_layout_is_read_from_the_folder_and_recorded(sd2, sd2_model, tiny_backbones):
    assert layout_of_folder(sd2) == DiffusionLayout("stable_diffusion", 48, objective="v_prediction")
    assert layout_of_folder(tiny_backbones["sd"]) == DiffusionLayout("stable_diffusion", 32)
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
    full = pipe(PROMPT, generator=seeded(0), num_inference_steps=2, **LLM)
    stock = StableDiffusionPipeline.from_pretrained(sd2, safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    image = stock(prompt_embeds=prompt_embeds, num_inference_steps=2, generator=seeded(0)).images[0]
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


@pytest.fixture(scope="module")
def sdxl(tiny_diffusion):
    return tiny_diffusion["sdxl"]


@pytest.fixture(scope="module")
def sdxl_model(tiny_backbones, sdxl):
    return gill_on(tiny_backbones, sdxl)


def test_sdxl_layout_is_read_from_the_folder_and_recorded(sdxl, sdxl_model):
    assert layout_of_folder(sdxl) == DiffusionLayout("sdxl", 64, 32)
    config = sdxl_model.config
    assert (config.diffusion_layout, config.gen_emb_dim, config.gen_pooled_dim) == ("sdxl", 64, 32)
    assert layout_of_pipeline(StableDiffusionXLPipeline.from_pretrained(sdxl)) == layout_of_folder(sdxl)
    with pytest.raises(StrictDataclassError, match="gen_pooled_dim must be a positive width for diffusion_layout="):
        GILLConfig(diffusion_layout="sdxl", gen_emb_dim=64)
    with pytest.raises(StrictDataclassError, match="got 32 for 'stable_diffusion'"):
        GILLConfig(gen_pooled_dim=32)


@pytest.mark.parametrize("cfg_dropout_prob", [0.0, 0.1])
def test_sdxl_encode_prompt_drives_the_stock_pipeline_to_the_same_image(tiny_backbones, sdxl, cfg_dropout_prob):
    torch.manual_seed(0)
    model = GILLForConditionalGeneration.from_backbones(tiny_backbones["opt"], tiny_backbones["clip"], sdxl,
                                                        cfg_dropout_prob=cfg_dropout_prob, **SMALL_MAPPER).eval()
    pipe = GILLPipeline.from_gill(model, sdxl)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.text_encoder is None  # SDXL's empty negative is zeros: no text encoder needed
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, **LLM)
    assert embeds.shape == (1, 77, 64) and pooled.shape == (1, 32)
    assert torch.equal(pooled, model.adapter.pooled_head.proj(embeds.mean(1)))
    if cfg_dropout_prob:  # the mapped null, for both tensors (no_grad: the path inference takes)
        with torch.no_grad():
            null = model.mapped_null_embedding()
            assert torch.equal(negative, null)
            assert torch.equal(negative_pooled, model.adapter.pooled_head.proj(null.mean(1)))
    else:
        assert negative is None and negative_pooled is None
    full = pipe(PROMPT, generator=seeded(0), num_inference_steps=2, **LLM)
    stock = StableDiffusionXLPipeline.from_pretrained(sdxl)
    stock.set_progress_bar_config(disable=True)
    kwargs = pipe.encode_prompt(PROMPT, return_dict=True, **LLM)
    assert list(kwargs) == ["prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                            "negative_pooled_prompt_embeds"]
    image = stock(**kwargs, num_inference_steps=2, generator=seeded(0)).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(full.images[0]))
    direct = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=negative_pooled, generator=seeded(0), num_inference_steps=2)
    assert np.array_equal(np.asarray(direct.images[0]), np.asarray(full.images[0]))


def test_sdxl_pooled_inputs_are_checked(sdxl_model, sdxl, make_model):
    pipe = GILLPipeline.from_gill(sdxl_model, sdxl)
    embeds = torch.zeros(1, 77, 64)
    with pytest.raises(ValueError, match=r"needs pooled_prompt_embeds \(N, 32\)"):
        pipe(prompt_embeds=embeds, num_inference_steps=1)
    with pytest.raises(ValueError, match=r"pooled_prompt_embeds must be \(1, 32\).*got \(1, 31\)"):
        pipe(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 31), num_inference_steps=1)
    with pytest.raises(ValueError, match="go with prompt_embeds"):
        pipe(PROMPT, pooled_prompt_embeds=torch.zeros(1, 32), **LLM)
    sd1 = GILLPipeline.from_gill(make_model("opt"))
    with pytest.raises(ValueError, match="takes no pooled_prompt_embeds"):
        sd1(prompt_embeds=torch.zeros(1, 77, 32), pooled_prompt_embeds=torch.zeros(1, 32), num_inference_steps=1)
    with pytest.raises(ValueError, match=r"trained for the stable_diffusion \(L x 32\).*consumes "
                                         r"sdxl \(L x 64 \+ pooled 32\)"):
        GILLPipeline.from_gill(make_model("opt"), sdxl)


def test_sdxl_targets_are_the_stock_pipelines_embeds_and_round_trip(sdxl, tmp_path):
    captions = ["a red circle", "a blue square at the top", "a star"]
    stock = StableDiffusionXLPipeline.from_pretrained(sdxl)
    embeds, _, pooled, _ = stock.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    encoder = DiffusionTextEncoder(sdxl)
    got_embeds, got_pooled = encoder(captions)
    assert torch.equal(got_embeds, embeds) and torch.equal(got_pooled, pooled)
    store = TargetStore(precompute_targets(captions, tmp_path / "t", encoder, shard_size=2, dtype="float32",
                                           progress=False))
    assert store.pooled_dim == 32 and sorted(p.name for p in (tmp_path / "t").iterdir()) == [
        "caption-keys.npy", "index.json", "null-pooled.npy", "null.npy", "pooled-00000.npy", "pooled-00001.npy",
        "shard-00000.npy", "shard-00001.npy"]
    shards = [encoder(captions[:2]), encoder(captions[2:])]  # as written: one batch per shard
    for i in range(3):
        shard_embeds, shard_pooled = shards[i // 2]
        assert torch.equal(store[i], shard_embeds[i % 2]) and torch.equal(store.pooled(i), shard_pooled[i % 2])
    assert store.rows_for(captions[::-1]).tolist() == [2, 1, 0]
    null_embeds, null_pooled = encoder([""])
    assert torch.equal(store.null, null_embeds[0]) and torch.equal(store.null_pooled, null_pooled[0])
    (tmp_path / "t" / "pooled-00001.npy").unlink()
    with pytest.raises(ValueError, match=r"incomplete: 1 file\(s\) missing, e.g. \['pooled-00001.npy'\]"):
        TargetStore(tmp_path / "t")


def test_sdxl_generation_loss_counts_the_pooled_vector(sdxl_model, tmp_path):
    captions = ["a red circle on the left", "a blue square at the top"]
    store = TargetStore(precompute_targets(captions, tmp_path / "t", lambda c: (
        torch.randn(len(c), 77, 64), torch.randn(len(c), 32)), dtype="float32", progress=False))
    collator = GILLDataCollator(sdxl_model.processor, max_length=24, targets=store)
    batch = collator([{"caption": c, "image": Image.new("RGB", (40, 36), "red"), "index": i}
                      for i, c in enumerate(captions)])
    assert batch["gen_pooled_targets"].shape == (2, 32) and torch.equal(batch["null_gen_pooled_target"],
                                                                       store.null_pooled)
    out = sdxl_model(**batch, gill_objective=True, pack=False)
    with torch.no_grad():
        pooled = sdxl_model.adapter.pooled_head.proj(out.gen_embeds.mean(1))
    by_hand = (out.gen_embeds - batch["gen_targets"]).norm(dim=-1).mean() \
        + (pooled - batch["gen_pooled_targets"]).norm(dim=-1).mean()
    assert out.gen_loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    del batch["gen_pooled_targets"], batch["null_gen_pooled_target"]
    with pytest.raises(ValueError, match=r"the sdxl layout needs gen_pooled_targets \(N, 32\)"):
        sdxl_model(**batch, gill_objective=True, pack=False)


def test_sdxl_latent_diffusion_loss_takes_the_pooled_vector_and_time_ids(sdxl):
    ldm = LatentDiffusionLoss.from_pretrained(sdxl)
    cond, pooled = torch.randn(2, 77, 64), torch.randn(2, 32)
    pixels = torch.rand(2, 3, ldm.image_size, ldm.image_size) * 2 - 1
    with pytest.raises(ValueError, match="needs the pooled vector"):
        ldm(cond, pixels)
    torch.manual_seed(3)
    loss = ldm(cond, pixels, pooled)
    torch.manual_seed(3)  # the same draws, by hand
    x0 = ldm.vae.encode(pixels).latent_dist.sample() * ldm.vae.config.scaling_factor
    noise = torch.randn_like(x0)
    steps = torch.randint(0, ldm.scheduler.config.num_train_timesteps, (2,))
    time_ids = torch.tensor([[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2)
    with torch.no_grad():
        pred = ldm.unet(ldm.scheduler.add_noise(x0, noise, steps), steps, encoder_hidden_states=cond,
                        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
    assert loss.item() == pytest.approx(((pred - noise) ** 2).mean().item(), rel=1e-5)


def test_sdxl_pipeline_round_trips_and_the_cli_precomputes_its_targets(sdxl_model, sdxl, tmp_path):
    from gill_hf.cli import main

    pipe = GILLPipeline.from_gill(sdxl_model, sdxl)
    pipe.set_progress_bar_config(disable=True)
    cond = dict(prompt_embeds=torch.randn(1, 77, 64), pooled_prompt_embeds=torch.randn(1, 32), num_inference_steps=2,
                output_type="np")
    before = pipe(**cond, generator=seeded(0)).images[0]
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = GILLPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    assert (loaded.gill_model.config.diffusion_layout, loaded.gill_model.config.gen_pooled_dim) == ("sdxl", 32)
    assert np.array_equal(loaded(**cond, generator=seeded(0)).images[0], before)
    tsv = tmp_path / "c.tsv"
    tsv.write_text("caption\timage\na red circle\tx.png\na star\ty.png\n")
    assert main(["precompute-targets", str(tsv), str(tmp_path / "t"), "--diffusion-model", sdxl,
                 "--dtype", "float32"]) == 0
    store = TargetStore(tmp_path / "t")
    embeds, pooled = DiffusionTextEncoder(sdxl)(["a red circle", "a star"])
    assert torch.equal(store[1], embeds[1]) and torch.equal(store.pooled(1), pooled[1])


def test_an_unsupported_family_is_named_before_any_backbone_loads(tiny_backbones, tmp_path):
    folder = tmp_path / "pixart"
    (folder / "transformer").mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]}))
    (folder / "transformer" / "config.json").write_text(json.dumps({"_class_name": "PixArtTransformer2DModel"}))
    with pytest.raises(ValueError, match=r"no GILL target layout for a PixArtTransformer2DModel denoiser.*"
                                         r"supported families: \['flux', 'sd3', 'sdxl', 'stable_diffusion'\]"):
        GILLForConditionalGeneration.from_backbones("no/such-llm", tiny_backbones["clip"], str(folder))


def test_the_web_demo_defaults_to_the_familys_guidance_scale(sdxl_model, sdxl):
    from gill_hf.demo.web import DemoSettings

    pipe = GILLPipeline.from_gill(sdxl_model, sdxl)
    pipe.set_progress_bar_config(disable=True)
    kwargs = DemoSettings().pipeline_kwargs(pipe)
    assert kwargs["guidance_scale"] is None and pipe.default_guidance_scale == 5.0
    cond = dict(prompt_embeds=torch.randn(1, 77, 64), pooled_prompt_embeds=torch.randn(1, 32), num_inference_steps=2,
                output_type="np")
    images = {scale: pipe(**cond, guidance_scale=scale, generator=seeded(0)).images[0] for scale in (None, 5.0, 7.5)}
    assert np.array_equal(images[None], images[5.0]) and not np.array_equal(images[None], images[7.5])
    with pytest.raises(ValueError, match=r"guidance_scale must be >= 0 or None, got -1"):
        DemoSettings(guidance_scale=-1)


def _stage2_batch(model, ldm_image_size=None):
    """One stage-2 example whose answer is an image: a context caption + image, an instruction, a target image."""
    from gill_hf.training import InterleavedDataCollator

    example = {"index": 0, "context": ["a red circle", Image.new("RGB", (40, 36), "red")],
               "instruction": "Show the next picture.", "instruction_image": None, "target_text": "a blue square",
               "output_image": Image.new("RGB", (36, 40), "blue")}
    return InterleavedDataCollator(model.processor, ldm_image_size=ldm_image_size)([example])


def test_sdxl_stage2_takes_pooled_targets_in_l_g_and_the_ldm_loss(tiny_backbones, sdxl, tmp_path):
    from gill_hf.training import GILLForInterleavedTraining, GILLTrainer
    from gill_hf.training.trainer import training_arguments

    torch.manual_seed(0)
    model = GILLForInterleavedTraining.from_backbones(tiny_backbones["opt"], tiny_backbones["clip"], sdxl,
                                                      cfg_dropout_prob=1.0, ldm_loss_weight=1.0, **SMALL_MAPPER)
    ldm = LatentDiffusionLoss.from_pretrained(sdxl)
    batch = _stage2_batch(model, ldm.image_size)
    targets = dict(gen_targets=torch.randn(1, 77, 64), gen_pooled_targets=torch.randn(1, 32))
    nulls = dict(null_gen_target=torch.randn(77, 64), null_gen_pooled_target=torch.randn(32))
    out = model.eval()(**{k: v for k, v in batch.items() if k != "ldm_pixel_values"}, **targets, gill_objective=True)
    with torch.no_grad():
        pooled = model.adapter.pooled_head.proj(out.gen_embeds.mean(1))
    by_hand = (out.gen_embeds - targets["gen_targets"]).norm(dim=-1).mean() \
        + (pooled - targets["gen_pooled_targets"]).norm(dim=-1).mean()
    assert out.gen_loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    model.train()  # cfg_dropout_prob=1: every block's targets are the null ones, the pooled one included
    out = model(**{k: v for k, v in batch.items() if k != "ldm_pixel_values"}, **targets, **nulls,
                gill_objective=True)
    with torch.no_grad():
        pooled = model.adapter.pooled_head.proj(out.gen_embeds.mean(1))
    by_hand = (out.gen_embeds - nulls["null_gen_target"]).norm(dim=-1).mean() \
        + (pooled - nulls["null_gen_pooled_target"]).norm(dim=-1).mean()
    assert out.gen_loss.item() == pytest.approx(by_hand.item(), rel=1e-5)
    with pytest.raises(ValueError, match=r"the sdxl layout needs gen_pooled_targets \(N, 32\)"):
        model(**{k: v for k, v in batch.items() if k != "ldm_pixel_values"}, gen_targets=targets["gen_targets"],
              **nulls, gill_objective=True)
    trainer = GILLTrainer(model=model.eval(), args=training_arguments(str(tmp_path), use_cpu=True,
                                                                     disable_tqdm=True),
                          ldm_loss=ldm)
    torch.manual_seed(5)
    loss, out = trainer.compute_loss(model, dict(batch), return_outputs=True)
    torch.manual_seed(5)  # the LDM term by hand: the pooled head's vector reaches the SDXL UNet
    ldm_by_hand = ldm(out.gen_embeds, batch["ldm_pixel_values"], model.gen_pooled_embeddings(out.gen_embeds))
    assert loss.item() == pytest.approx((out.loss + ldm_by_hand).item(), rel=1e-5)
