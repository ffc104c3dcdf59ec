"""Backbones that know the toy world, trained by :func:`pretrain_toy_backbones` and shipped as fp16 safetensors.

* a tiny OPT (the random tiny OPT's config and tokenizer, ``gill_hf.tiny``) pretrained on toy stories whose next
  step follows from the last (:func:`story_corpus`), so greedy continuations are sentences of the toy grammar that
  continue the story ("a red circle on the left" -> "then a red circle at the top") and its states keep the
  caption's colour, shape and place (which GILL's mappers read);
* a tiny Stable Diffusion (its own CLIP text encoder, UNet2DConditionModel, AutoencoderKL; 32 x 32 px, latents
  4 x 16 x 16, x0-prediction) trained on the rendered scenes, so a caption draws its shape, colour and place;
* the :class:`~gill_hf.toy_world.probe.ToyProbe` that judges images.

:func:`toy_backbones` turns the shipped weight files (``weights/``) into loadable ``save_pretrained`` folders;
``gill-hf tiny-backbones --pretrained OUT`` reruns the training that made them (16 minutes measured on 2 CPU cores
shared with other jobs at load ~10: VAE 242 s, diffusion 637 s, probe 10 s; the LLM, 1200 steps, 31 s at load ~2).
"""

import json
import logging
import os
import random
import re
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .probe import ToyProbe, chance_correctness, correctness, scene_tensor, train_probe
from .scenes import COLOURS, SHAPES, all_scenes, novel_prompts, scene_caption

logger = logging.getLogger(__name__)
LOG_EVERY = 100  # optimizer steps between logged losses
WEIGHTS_DIR = Path(__file__).parent / "weights"  # the shipped fp16 files
WEIGHT_FILES = ("llm", "text_encoder", "unet", "vae", "probe")
IMAGE_SIZE = 32  # px the diffusion model draws
PLACE_CYCLE = ("left", "top", "right", "bottom")  # where a moving thing goes next in a story
MIN_SCENE_ACCURACY = 0.4  # share of captions drawn with colour, shape and place all right (chance: 1/72)
STEP_PATTERN = re.compile(rf"then an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
                          rf"(on the (left|right)|at the (top|bottom))")


@dataclass
class PretrainSettings:
    """Steps and rates of the three trainings; the defaults pass :func:`quality_checks`."""

    llm_steps: int = 1200
    vae_steps: int = 600
    diffusion_steps: int = 800
    probe_steps: int = 400
    batch_size: int = 32  # LLM and VAE rows per step
    diffusion_batch_size: int = 96
    seed: int = 0

    def __post_init__(self):
        for name in ("llm_steps", "vae_steps", "diffusion_steps", "probe_steps", "batch_size", "diffusion_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


def moved(scene: tuple[str, str, str]) -> tuple[str, str, str]:
    """The same thing at the next place of :data:`PLACE_CYCLE`."""
    colour, shape, position = scene
    return colour, shape, PLACE_CYCLE[(PLACE_CYCLE.index(position) + 1) % len(PLACE_CYCLE)]


def next_scene(scene: tuple[str, str, str], rng: random.Random) -> tuple[str, str, str]:
    """The scene a story moves to from ``scene``, so the next step depends on the last: the same thing at the next
    place (left, top, right, bottom, left, ...; 60%), or the same place with another colour or another shape
    (20% each)."""
    colour, shape, position = scene
    kind = rng.random()
    if kind < 0.6:
        return moved(scene)
    if kind < 0.8:
        return rng.choice([c for c in COLOURS if c != colour]), shape, position
    return colour, rng.choice([s for s in SHAPES if s != shape]), position


def story_corpus(n: int, seed: int) -> list[str]:
    """``n`` toy stories of 1-4 steps ("a red circle on the left then a red circle at the top"), each step
    following from the one before (:func:`next_scene`), so the LLM must keep a step's colour, shape and place in
    its states; about one story in six starts with a description the corpus never draws, so the LLM also reads
    those."""
    rng = random.Random(seed)
    scenes, novel = all_scenes(), novel_prompts(200, seed=seed)
    stories = []
    for _ in range(n):
        scene = rng.choice(scenes)
        steps = [scene_caption(scene)]
        for _ in range(rng.randint(0, 3)):
            scene = next_scene(scene, rng)
            steps.append(scene_caption(scene))
        if rng.random() < 1 / 6:
            steps.insert(0, rng.choice(novel))
        stories.append(" then ".join(steps))
    return stories


def _llm_batch(tokenizer, texts: list[str]) -> dict:
    """``<s> text </s>`` rows, right-padded; labels -100 on padding."""
    ids = [[tokenizer.bos_token_id, *tokenizer(t, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
           for t in texts]
    width = max(map(len, ids))
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in ids])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


def _log(name: str, step: int, loss: torch.Tensor):
    if step % LOG_EVERY == 0:
        logger.info("%s step %d: loss %.4f", name, step, loss.item())


def _cosine_optimizer(params, lr: float, steps: int):
    """AdamW with a 5% linear warm-up then cosine decay to 0 over ``steps``."""
    from transformers import get_cosine_schedule_with_warmup

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return optimizer, get_cosine_schedule_with_warmup(optimizer, max(1, steps // 20), steps)


def train_toy_llm(settings: PretrainSettings):
    """The tiny OPT trained on :func:`story_corpus` (next-token cross-entropy) -> (model, tokenizer)."""
    from transformers import AutoModelForCausalLM

    from ..tiny import build_tiny_tokenizer, tiny_llm_config

    torch.manual_seed(settings.seed)
    tokenizer = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_llm_config("opt", len(tokenizer)))
    corpus = story_corpus(settings.llm_steps * settings.batch_size, settings.seed)
    optimizer, schedule = _cosine_optimizer(model.parameters(), 3e-3, settings.llm_steps)
    model.train()
    for step in range(settings.llm_steps):
        loss = model(**_llm_batch(tokenizer, corpus[step * settings.batch_size:(step + 1) * settings.batch_size])).loss
        _log("llm", step, loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval(), tokenizer


def diffusion_parts():
    """Untrained text encoder, tokenizer, UNet, VAE and scheduler of the toy Stable Diffusion."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from ..tiny import _build_clip_text_tokenizer, _tiny_text_config

    tokenizer = _build_clip_text_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, 32))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=8, attention_head_dim=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 32),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        norm_num_groups=8, sample_size=IMAGE_SIZE, mid_block_add_attention=False)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1, prediction_type="sample")
    return text_encoder, tokenizer, unet, vae, scheduler


def train_toy_vae(vae, images: torch.Tensor, settings: PretrainSettings):
    """Fit the VAE to reconstruct every scene (``images`` ``(72, 3, 32, 32)`` in [-1, 1]) from its posterior mean
    plus a little noise (MSE; the diffusion model only ever hands it latents near the scenes'), then set its
    ``scaling_factor`` so the latents have unit standard deviation."""
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    optimizer, schedule = _cosine_optimizer(vae.parameters(), 3e-3, settings.vae_steps)
    vae.train()
    for step in range(settings.vae_steps):
        batch = images[[rng.randrange(len(images)) for _ in range(settings.batch_size)]]
        latents = vae.encode(batch).latent_dist.mean
        latents = latents + 0.05 * latents.detach().std() * torch.randn_like(latents)
        loss = F.mse_loss(vae.decode(latents).sample, batch)
        _log("vae", step, loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return latents * vae.config.scaling_factor


def _encode(text_encoder, tokenizer, captions: list[str]) -> torch.Tensor:
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_toy_diffusion(text_encoder, tokenizer, unet, scheduler, latents: torch.Tensor, settings: PretrainSettings):
    """Train the UNet and text encoder together to predict the clean latent (x0) of a scene from its noised latent
    and caption; captions are written as story steps ("then a ...") 30% of the time and dropped to "" 10%.
    Timesteps lean to the noisy end (``t = T * sqrt(u)``), where the caption decides the picture."""
    torch.manual_seed(settings.seed)
    rng = random.Random(settings.seed)
    scenes = all_scenes()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer, schedule = _cosine_optimizer(params, 3e-3, settings.diffusion_steps)
    unet.train()
    text_encoder.train()
    for step in range(settings.diffusion_steps):
        rows = [rng.randrange(len(scenes)) for _ in range(settings.diffusion_batch_size)]
        captions = [("" if rng.random() < 0.1 else ("then " if rng.random() < 0.3 else "") + scene_caption(scenes[i]))
                    for i in rows]
        clean = latents[rows]
        t = (scheduler.config.num_train_timesteps * torch.rand(len(rows)).sqrt()).long().clamp(
            max=scheduler.config.num_train_timesteps - 1)
        noisy = scheduler.add_noise(clean, torch.randn_like(clean), t)
        loss = F.mse_loss(unet(noisy, t, _encode(text_encoder, tokenizer, captions)).sample, clean)
        _log("diffusion", step, loss)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
    unet.eval()
    text_encoder.eval()


def pretrain_toy_backbones(out_dir: str | os.PathLike, settings: PretrainSettings | None = None) -> dict:
    """Train the toy LLM, diffusion model and probe; write their fp16 weights to ``out_dir/weights`` (the files
    shipped in the package), loadable folders beside them (:func:`toy_backbones`) and ``checks.json`` with
    :func:`quality_checks` and the seconds each training took. Returns that record."""
    settings = settings or PretrainSettings()
    out = Path(out_dir)
    timings, clock = {}, time.perf_counter()
    llm, _ = train_toy_llm(settings)
    timings["llm"] = round(time.perf_counter() - clock, 1)
    text_encoder, tokenizer, unet, vae, scheduler = diffusion_parts()
    latents = train_toy_vae(vae, scene_tensor(all_scenes()) * 2 - 1, settings)
    timings["vae"] = round(time.perf_counter() - clock - sum(timings.values()), 1)
    train_toy_diffusion(text_encoder, tokenizer, unet, scheduler, latents, settings)
    timings["diffusion"] = round(time.perf_counter() - clock - sum(timings.values()), 1)
    probe = train_probe(settings.probe_steps, seed=settings.seed)
    timings["probe"] = round(time.perf_counter() - clock - sum(timings.values()), 1)
    weights = out / "weights"
    weights.mkdir(parents=True, exist_ok=True)
    modules = {"llm": llm, "text_encoder": text_encoder, "unet": unet, "vae": vae, "probe": probe}
    for name, module in modules.items():
        state = {k: v.detach().half().contiguous() for k, v in module.state_dict().items()}
        save_file(state, weights / f"{name}.safetensors", metadata=_metadata(name, vae))
    paths = toy_backbones(out, weights)
    record = {"settings": asdict(settings), "timings_s": timings, "checks": quality_checks(paths)}
    (out / "checks.json").write_text(json.dumps(record, indent=1))
    return record


def _metadata(name: str, vae) -> dict[str, str]:
    return {"scaling_factor": repr(vae.config.scaling_factor)} if name == "vae" else {}


def _load_into(module, path: Path):
    """Load an fp16 weight file into a float32 module, keys and shapes checked."""
    module.load_state_dict({k: v.float() for k, v in load_file(path).items()}, strict=True)
    return module


def _write_llm(folder: Path, weights: Path):
    from transformers import AutoModelForCausalLM

    from ..tiny import build_tiny_tokenizer, tiny_llm_config

    tokenizer = build_tiny_tokenizer()
    model = AutoModelForCausalLM.from_config(tiny_llm_config("opt", len(tokenizer)))
    model.tie_weights()
    state = {k: v.float() for k, v in load_file(weights / "llm.safetensors").items()}
    model.load_state_dict(state, strict=False)  # the tied lm_head is stored once
    missing = set(model.state_dict()) - set(state) - {"lm_head.weight"}
    if missing:
        raise ValueError(f"{weights / 'llm.safetensors'} lacks {sorted(missing)}")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _write_diffusion(folder: Path, weights: Path):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    text_encoder, tokenizer, unet, vae, scheduler = diffusion_parts()
    for name, module in (("text_encoder", text_encoder), ("unet", unet), ("vae", vae)):
        _load_into(module, weights / f"{name}.safetensors")
    with safe_open(weights / "vae.safetensors", "pt") as handle:
        vae.register_to_config(scaling_factor=float(handle.metadata()["scaling_factor"]))
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(folder)


def _write_clip(folder: Path, weights: Path):
    from ..tiny import _save_clip

    torch.manual_seed(0)  # the same random CLIP as the tiny backbones' (the toy world needs no trained one)
    _save_clip(folder)


def toy_backbones(out_dir: str | os.PathLike, weights_dir: str | os.PathLike = WEIGHTS_DIR) -> dict[str, str]:
    """Write (or reuse) loadable folders of the knowing backbones from fp16 weight files: ``llm`` (OPT +
    tokenizer), ``clip`` (the random tiny CLIP vision encoder), ``sd`` (StableDiffusionPipeline folder), and the
    probe's weight file. Returns the paths by name: llm, clip, sd, probe."""
    weights, out = Path(weights_dir), Path(out_dir)
    missing = [f"{name}.safetensors" for name in WEIGHT_FILES if not (weights / f"{name}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"{weights} lacks the toy backbone weights {missing}; rebuild them with "
                                f"`gill-hf tiny-backbones --pretrained OUT`")
    out.mkdir(parents=True, exist_ok=True)
    writers = {"llm": ("config.json", _write_llm), "clip": ("config.json", _write_clip),
               "sd": ("model_index.json", _write_diffusion)}
    paths = {}
    for name, (marker, write) in writers.items():
        path = out / name
        if not (path / marker).exists():
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
            write(tmp, weights)
            os.replace(tmp, path)  # a crash leaves no half-written backbone behind
        paths[name] = str(path)
    paths["probe"] = str(weights / "probe.safetensors")
    return paths


def load_probe(path: str | os.PathLike) -> ToyProbe:
    """The probe from its weight file, in eval mode."""
    return _load_into(ToyProbe(), Path(path)).eval()


@torch.no_grad()
def llm_continuations(llm_path: str, prompts: list[str], max_new_tokens: int = 12) -> list[str]:
    """Greedy continuations (decoded text after each prompt) of the LLM folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(llm_path)
    model = AutoModelForCausalLM.from_pretrained(llm_path).eval()
    texts = []
    for prompt in prompts:
        ids = torch.tensor([[tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False)["input_ids"]]])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
        texts.append(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    return texts


@torch.no_grad()
def draw_captions(sd_path: str, captions: list[str], steps: int = 8, guidance_scale: float = 2.0,
                  seed: int = 0) -> torch.Tensor:
    """Images the diffusion folder draws for ``captions``: ``(N, 3, 32, 32)`` in [0, 1]."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(captions, num_inference_steps=steps, guidance_scale=guidance_scale, output_type="pt",
                  generator=torch.Generator().manual_seed(seed)).images
    return images.clamp(0, 1)


def quality_checks(paths: dict[str, str]) -> dict:
    """What the knowing backbones must do, measured: the probe reads rendered scenes right; the diffusion model's
    images of every caption (plain and as a story step) are read by the probe at the right place (>= 90%) and as
    the whole scene (>= ``MIN_SCENE_ACCURACY``; the shipped model: place 100%, shape 76%, colour 56%); greedy LLM
    continuations of held-out-style prompts start with a toy-grammar story step, and those of corpus captions with
the story's likeliest next step (the same thing at the next place, :func:`moved`), so the LLM's states carry the
caption's colour and shape. ``passed`` holds the verdict."""
    scenes = all_scenes()
    probe = load_probe(paths["probe"])
    rendered = correctness(probe.predict(scene_tensor(scenes)), scenes)
    drawn = correctness(probe.predict(draw_captions(paths["sd"], [scene_caption(s) for s in scenes])), scenes)
    drawn_then = correctness(probe.predict(draw_captions(paths["sd"], ["then " + scene_caption(s) for s in scenes],
                                                         seed=1)), scenes)
    story_scenes = scenes[::6]
    prompts = [scene_caption(s) for s in story_scenes] + novel_prompts(6, seed=11)
    continuations = llm_continuations(paths["llm"], prompts)
    grammatical = sum(bool(STEP_PATTERN.match(text.strip())) for text in continuations) / len(prompts)
    follows = sum(text.strip().startswith("then " + scene_caption(moved(scene)))
                  for scene, text in zip(story_scenes, continuations)) / len(story_scenes)
    checks = {"probe_on_rendered": rendered, "diffusion_from_caption": drawn, "diffusion_from_story_step": drawn_then,
              "chance": chance_correctness(), "llm_grammatical_continuations": grammatical,
              "llm_continues_the_story": follows, "llm_samples": dict(zip(prompts, continuations))}
    checks["passed"] = (rendered["scene"] == 1.0 and grammatical >= 0.9 and follows >= 0.9
                        and all(d["position"] >= 0.9 and d["scene"] >= MIN_SCENE_ACCURACY for d in (drawn, drawn_then)))
    return checks


__all__ = ["PretrainSettings", "draw_captions", "llm_continuations", "load_probe",
           "pretrain_toy_backbones", "quality_checks", "toy_backbones"]
