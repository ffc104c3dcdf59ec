"""Target layouts: which conditioning tensors each diffusers text-to-image family consumes, and their shapes.

A *family* (:class:`DiffusionFamily`) is told by its denoiser and has one diffusers pipeline class: the
tensors its ``encode_prompt`` returns (in that order), the text encoders whose outputs GILL's mapper learns to
predict and which hidden state of them is used. A *layout* (:class:`DiffusionLayout`) is a family at the widths of
one checkpoint, plus the training objective of its scheduler. ``GILLConfig.diffusion_layout`` records the family a
model was trained for (``gen_emb_dim`` the sequence width, ``gen_pooled_dim`` the pooled one), and
:func:`check_layout` refuses a diffusion model of another layout.

| family | pipeline | conditioning (per image) | targets |
|---|---|---|---|
| ``stable_diffusion`` (SD 1.x, 2.x) | ``StableDiffusionPipeline`` | ``prompt_embeds`` (L, D) | ``last_hidden_state`` |
| ``sdxl`` | ``StableDiffusionXLPipeline`` | ``prompt_embeds`` (L, D1 + D2), ``pooled_prompt_embeds`` (P) | \
``hidden_states[-2]`` of both, concatenated; ``text_encoder_2``'s ``text_embeds`` |
| ``sd3`` | ``StableDiffusion3Pipeline`` | ``prompt_embeds`` (77 + 256, D_T5), ``pooled_prompt_embeds`` (P1 + P2) | \
CLIP-L ++ CLIP-G ``hidden_states[-2]`` zero-padded to the T5 width, then T5's states along the sequence; both \
CLIP ``text_embeds`` |
| ``flux`` | ``FluxPipeline`` | ``prompt_embeds`` (512, D_T5), ``pooled_prompt_embeds`` (P) | T5's states; CLIP's \
``pooler_output`` |

SDXL's size / crop ``time_ids`` are not text conditioning: the pipeline builds them from the image size, as diffusers'
does, and its empty negative prompt is all zeros (``force_zeros_for_empty_prompt``). L is the full sequence the
diffusers pipeline builds with its default ``max_sequence_length`` (:attr:`DiffusionFamily.sequence_length`, the
default ``GILLConfig.num_gen_queries``). SD3 and Flux are trained by flow matching (:mod:`gill_hf.training.ldm_loss`);
Flux has no classifier-free guidance: ``guidance_scale`` is embedded in its transformer, as ``FluxPipeline`` does.
"""

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class DiffusionFamily:
    """One diffusers pipeline family: ``denoiser`` its component ("unet" or "transformer"); ``conditioning`` = its
    ``encode_prompt`` outputs (by keyword name) in order; ``text_encoders`` = the CLIP components (with their
    tokenizers, ``tokenizer`` for ``text_encoder``) whose states, concatenated on the feature axis, are the sequence
    targets; ``hidden_state`` = which entry of their ``hidden_states`` (None: the ``last_hidden_state``);
    ``t5_encoder`` = a T5 component whose ``last_hidden_state`` (``t5_length`` tokens) follows them along the
    sequence, the CLIP states zero-padded to its width (or is the whole sequence, without CLIP states)."""

    name: str
    pipeline_class: str
    conditioning: tuple[str, ...]
    text_encoders: tuple[str, ...]
    hidden_state: int | None = None
    pooled_encoders: tuple[str, ...] = ()  # their pooled outputs, concatenated, are the pooled target
    t5_encoder: str | None = None
    t5_length: int = 0  # the diffusers pipeline's default max_sequence_length
    denoiser: str = "unet"
    zero_empty_prompt: bool = False  # the pipeline's empty negative prompt is zeros, not the encoding of ""
    classifier_free_guidance: bool = True  # False: guidance_scale is embedded in the transformer (Flux)
    guidance_scale: float = 7.5  # the diffusers pipeline's default guidance scale
    packed_latents: bool = False  # 2 x 2 latent patches packed into tokens (Flux)
    timestep_sampling: str | None = None  # flow matching: diffusers' training script's default weighting_scheme

    @property
    def components(self) -> tuple[str, ...]:
        """Every text encoder the targets read, in the diffusers pipeline's order."""
        names = (*self.text_encoders, *self.pooled_encoders, *([self.t5_encoder] if self.t5_encoder else []))
        return tuple(sorted(set(names)))

    @property
    def sequence_length(self) -> int:
        """L of the diffusers pipeline's ``prompt_embeds`` (CLIP's 77 tokens, then T5's)."""
        return (77 if self.text_encoders else 0) + self.t5_length

    @property
    def empty_prompt_encoders(self) -> tuple[str, ...]:
        """The text encoders a pipeline keeps to embed the empty negative prompt (none where it is zeros or where
        the family has no classifier-free guidance)."""
        return () if self.zero_empty_prompt or not self.classifier_free_guidance else self.components


FAMILIES = {
    "stable_diffusion": DiffusionFamily(
        "stable_diffusion", "StableDiffusionPipeline", ("prompt_embeds", "negative_prompt_embeds"),
        ("text_encoder",)),
    "sdxl": DiffusionFamily(
        "sdxl", "StableDiffusionXLPipeline",
        ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        ("text_encoder", "text_encoder_2"), hidden_state=-2, pooled_encoders=("text_encoder_2",),
        zero_empty_prompt=True, guidance_scale=5.0),
    "sd3": DiffusionFamily(
        "sd3", "StableDiffusion3Pipeline",
        ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
        ("text_encoder", "text_encoder_2"), hidden_state=-2, pooled_encoders=("text_encoder", "text_encoder_2"),
        t5_encoder="text_encoder_3", t5_length=256, denoiser="transformer", guidance_scale=7.0,
        timestep_sampling="logit_normal"),
    "flux": DiffusionFamily(
        "flux", "FluxPipeline", ("prompt_embeds", "pooled_prompt_embeds"), (), pooled_encoders=("text_encoder",),
        t5_encoder="text_encoder_2", t5_length=512, denoiser="transformer", classifier_free_guidance=False,
        guidance_scale=3.5, packed_latents=True, timestep_sampling="none"),
}
TRANSFORMER_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}  # denoiser class -> family
SDXL_TIME_IDS = 6  # original size (h, w), crop top-left (y, x), target size (h, w)


@dataclass(frozen=True)
class DiffusionLayout:
    """A family at one checkpoint's widths: ``sequence_dim`` D of the per-token conditioning, ``pooled_dim`` P of
    the pooled vector (None: the family has none) and the scheduler's training ``objective`` ("epsilon",
    "v_prediction" or "flow_matching")."""

    family: str
    sequence_dim: int
    pooled_dim: int | None = None
    objective: str = "epsilon"

    def __str__(self) -> str:
        pooled = f" + pooled {self.pooled_dim}" if self.pooled_dim else ""
        return f"{self.family} (L x {self.sequence_dim}{pooled})"

    def matches(self, other: "DiffusionLayout") -> bool:
        """Same tensors at the same widths (the objective only matters to the latent-diffusion loss)."""
        return (self.family, self.sequence_dim, self.pooled_dim) == (other.family, other.sequence_dim,
                                                                     other.pooled_dim)


def family_of_denoiser(denoiser_class: str, denoiser_config) -> DiffusionFamily:
    """The family whose denoiser (UNet / transformer) has this class and config; raise naming what is supported."""
    if denoiser_class in TRANSFORMER_FAMILIES:
        return FAMILIES[TRANSFORMER_FAMILIES[denoiser_class]]
    if denoiser_class == "UNet2DConditionModel":
        kind = {None: "stable_diffusion", "text_time": "sdxl"}.get(denoiser_config.get("addition_embed_type"))
        if kind is not None:
            return FAMILIES[kind]
    raise ValueError(f"no GILL target layout for a {denoiser_class} denoiser (addition_embed_type="
                     f"{denoiser_config.get('addition_embed_type')!r}); supported families: {sorted(FAMILIES)}")


def layout_of_configs(denoiser_class: str, denoiser_config, scheduler_config) -> DiffusionLayout:
    """The layout a denoiser of this class and config, trained with this scheduler, consumes."""
    family = family_of_denoiser(denoiser_class, denoiser_config)
    if family.denoiser == "transformer":  # joint attention over the T5-width sequence, pooled projection input
        return DiffusionLayout(family.name, denoiser_config["joint_attention_dim"],
                               denoiser_config["pooled_projection_dim"], "flow_matching")
    pooled = None
    if family.pooled_encoders:  # the UNet's added embedding takes [pooled ; time-id embeddings]
        pooled = denoiser_config["projection_class_embeddings_input_dim"] \
            - SDXL_TIME_IDS * denoiser_config["addition_time_embed_dim"]
    return DiffusionLayout(family.name, denoiser_config["cross_attention_dim"], pooled,
                           scheduler_config.get("prediction_type", "epsilon"))


def denoiser_of(pipe):
    """A diffusers pipeline's denoiser: its ``unet``, else its ``transformer``."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def layout_of_pipeline(pipe) -> DiffusionLayout:
    """The layout of a loaded diffusers pipeline (stock or GILL) from its denoiser and ``scheduler``."""
    denoiser = denoiser_of(pipe)
    return layout_of_configs(type(denoiser).__name__, denoiser.config, pipe.scheduler.config)


def layout_of_folder(path: str | os.PathLike, **hub_kwargs) -> DiffusionLayout:
    """The layout of a diffusers folder or Hub id, from its configs alone (no weights load)."""
    from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    path = os.fspath(path)
    components = DiffusionPipeline.load_config(path, **hub_kwargs)
    denoiser = next((name for name in ("unet", "transformer") if (components.get(name) or [None])[-1]), None)
    if denoiser is None:
        raise ValueError(f"{path}: model_index.json names no unet or transformer; expected a diffusers text-to-image "
                         f"pipeline (families: {sorted(FAMILIES)})")
    denoiser_class = components[denoiser][1]
    if denoiser != "unet":  # checked before any other file is read
        family_of_denoiser(denoiser_class, {})
    denoiser_config = UNet2DConditionModel.load_config(path, subfolder=denoiser, **hub_kwargs)  # any config.json
    scheduler_config = DDPMScheduler.load_config(path, subfolder="scheduler", **hub_kwargs)  # any class's config
    return layout_of_configs(denoiser_class, denoiser_config, scheduler_config)


def layout_of_config(config) -> DiffusionLayout:
    """The layout a :class:`~gill_hf.GILLConfig` was trained for."""
    return DiffusionLayout(config.diffusion_layout, config.gen_emb_dim, config.gen_pooled_dim)


def check_layout(model_layout: DiffusionLayout, diffusion_layout: DiffusionLayout):
    """Raise ``ValueError`` naming both layouts unless the GILL model's targets are the diffusion model's inputs."""
    if not model_layout.matches(diffusion_layout):
        raise ValueError(f"the GILL model was trained for the {model_layout} target layout but the diffusion model "
                         f"consumes {diffusion_layout}; wrap it with a diffusion model of its layout or retrain")
