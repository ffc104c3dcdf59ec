"""GILLPipeline: interleaved text/images in, interleaved text + retrieved or generated images out (paper Fig. 3).

One ``__call__`` runs the LLM (``gill_model.generate``, transformers' GenerationMixin), decides per [IMG] block
whether to retrieve or to generate (:mod:`gill_hf.decision`), searches the :class:`RetrievalIndex` and runs the
diffusion model only for the images that are generated, conditioned on the mapper output (``prompt_embeds``) and either the model's mapped-null
embedding (models trained with CFG dropout, MiniGPT-5) or the diffusion text encoder's ``""`` embedding (computed
once per pipeline) as ``negative_prompt_embeds``.

Loading from the Hub: diffusers cannot resolve a component class from a third-party package on a Hub repo (it
expects ``<component>/<module>.py`` files there; hf-ecosystem-notes §3.3), so :meth:`GILLPipeline.from_pretrained`
first downloads the repo with ``huggingface_hub.snapshot_download`` and then loads the local folder; the GILL
component itself reloads its frozen backbones by the ids in its ``config.json``::

    pipe = GILLPipeline.from_pretrained("user/gill-pipeline")        # snapshot, then local load
    pipe = GILLPipeline.from_pretrained("/path/to/saved/pipeline")   # saved with pipe.save_pretrained(...)
"""

import inspect
import math
import os
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import diffusers
from diffusers import AutoencoderKL, DiffusionPipeline, FluxTransformer2DModel, SD3Transformer2DModel, \
    UNet2DConditionModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .decision import Decision, decide
from .diffusion_layouts import FAMILIES, DiffusionLayout, check_layout, denoiser_of, layout_of_config, \
    layout_of_configs, layout_of_folder, layout_of_pipeline
from .generation_gill import GeneratedImageSlot, GILLGenerateOutput, image_conditioning
from .configuration_gill import GILLConfig
from .modeling_gill import GILLForConditionalGeneration
from .processing_gill import GILLProcessor, load_image
from .retrieval import RetrievalIndex

GILL_MODEL_FOLDER = "gill_model"
RETRIEVAL_FOLDER = "retrieval_index"


@dataclass
class ImagePart:
    """An image of the answer. ``kind`` "generated" (``image`` from the diffusion model) or "retrieved" (``path``
    of the best candidate, ``score`` = exp(logit_scale) * cosine, ``image`` loaded when the path is a local file);
    ``candidates``: the top-k ``(path, score)`` of the search, when an index was searched."""

    kind: Literal["generated", "retrieved"]
    image: Any
    decision: Decision
    score: float | None = None
    path: str | None = None
    candidates: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class GILLPipelineOutput(BaseOutput):
    """``parts``: the answer as ``str`` and :class:`ImagePart` items (a list of such lists for a batch of prompts);
    ``images``: every image of every answer in reading order; ``generation``: the raw LLM result."""

    parts: list
    images: list
    generation: GILLGenerateOutput | None = None


def _is_single_prompt(prompt) -> bool:
    if isinstance(prompt, (str, Image.Image, dict, os.PathLike)):
        return True
    return len(prompt) > 0 and not isinstance(prompt[0], (list, tuple))


def _is_text(part) -> bool:
    if isinstance(part, str):
        return bool(part.strip())
    return isinstance(part, dict) and (part.get("type") == "text" or "content" in part)  # chat-style parts


def _has_text(sample) -> bool:
    items = [sample] if isinstance(sample, (str, Image.Image, dict, os.PathLike)) else sample
    return any(_is_text(part) for part in items)


def _check_index_width(index: RetrievalIndex, config: GILLConfig):
    index.check_width(config.ret_emb_dim, "the GILL model's retrieval width (config.ret_emb_dim, W_t2i's outputs)")


def _with_tokenizers(text_encoders) -> list[str]:
    """Pipeline component names: each text encoder and its tokenizer (``text_encoder_2`` -> ``tokenizer_2``)."""
    return [name for encoder in sorted(text_encoders) for name in (encoder, encoder.replace("text_encoder",
                                                                                             "tokenizer"))]


class GILLPipeline(DiffusionPipeline):
    r"""GILL on a diffusers denoiser + VAE of any layout in :mod:`gill_hf.diffusion_layouts`: a UNet (SD 1.x / 2.x,
    SDXL) or a transformer (SD3, Flux); the GILL model must have been trained for the denoiser's layout.

    Components: ``gill_model`` (:class:`GILLForConditionalGeneration`), ``processor`` (:class:`GILLProcessor`),
    ``unet`` or ``transformer``, ``vae``, ``scheduler``; optional text encoders + tokenizers (``text_encoder`` /
    ``tokenizer``, SD3's ``_2`` and ``_3`` too: only to embed the empty negative prompt) and ``retrieval_index``
    (:class:`RetrievalIndex`, saved in ``retrieval_index/``).

    UNet layouts run the denoising loop below. Transformer layouts (flow matching) run their diffusers pipeline
    (``StableDiffusion3Pipeline`` / ``FluxPipeline``) on this pipeline's components with GILL's conditioning, so the
    shifted flow-matching schedule, Flux's latent packing and guidance embedding are diffusers' own; its
    ``callback_on_step_end`` receives that pipeline.
    """

    model_cpu_offload_seq = "gill_model->text_encoder->text_encoder_2->text_encoder_3->unet->transformer->vae"
    _optional_components = ["unet", "transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2",
                            "tokenizer_2", "text_encoder_3", "tokenizer_3"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, gill_model: GILLForConditionalGeneration, processor: GILLProcessor,
                 unet: UNet2DConditionModel | None = None, vae: AutoencoderKL | None = None,
                 scheduler: KarrasDiffusionSchedulers | None = None, text_encoder: CLIPTextModel | None = None,
                 tokenizer: CLIPTokenizer | None = None, retrieval_index: RetrievalIndex | None = None,
                 transformer: SD3Transformer2DModel | FluxTransformer2DModel | None = None,
                 text_encoder_2: CLIPTextModelWithProjection | None = None, tokenizer_2: CLIPTokenizer | None = None,
                 text_encoder_3: T5EncoderModel | None = None, tokenizer_3: T5TokenizerFast | None = None):
        super().__init__()
        if (unet is None) == (transformer is None) or vae is None or scheduler is None:
            raise ValueError("GILLPipeline needs a vae, a scheduler and exactly one denoiser: unet (SD 1.x / 2.x, "
                             "SDXL) or transformer (SD3, Flux)")
        gill_model.check_processor(processor)
        if gill_model.processor is None:
            gill_model.processor = processor
        denoiser = unet if unet is not None else transformer
        check_layout(layout_of_config(gill_model.config), layout_of_configs(type(denoiser).__name__, denoiser.config,
                                                                             scheduler.config))
        self.register_modules(gill_model=gill_model, processor=processor, unet=unet, transformer=transformer, vae=vae,
                              scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer,
                              text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
                              tokenizer_3=tokenizer_3)
        self.retrieval_index = retrieval_index
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)  # pixels per latent
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._empty_prompt_embeds = None  # (1, L, D), computed on first need

    @property
    def retrieval_index(self) -> RetrievalIndex | None:
        """The candidate images; assigning one checks its width against the model's retrieval space."""
        return self._retrieval_index

    @retrieval_index.setter
    def retrieval_index(self, index: RetrievalIndex | None):
        if index is not None:
            if not isinstance(index, RetrievalIndex):
                raise TypeError(f"retrieval_index must be a RetrievalIndex or None, got {type(index).__name__}")
            _check_index_width(index, self.gill_model.config)
        self._retrieval_index = index

    # ------------------------------------------------------------------ construction and persistence
    @classmethod
    def from_gill(cls, gill_model: GILLForConditionalGeneration, diffusion_model: str | None = None,
                  retrieval_index: RetrievalIndex | None = None, dtype: torch.dtype | None = None, **hub_kwargs):
        """Wrap a GILL model with the diffusion model named in its config (or ``diffusion_model``)."""
        source = diffusion_model or gill_model.config.diffusion_model_name_or_path
        if not source:
            raise ValueError("no diffusion model: pass diffusion_model= or set config.diffusion_model_name_or_path")
        components = DiffusionPipeline.load_config(source, **hub_kwargs)
        family = FAMILIES[layout_of_folder(source, **hub_kwargs).family]
        skipped = {name: None for name in ("safety_checker", *_with_tokenizers(set(family.components)
                                                                               - set(family.empty_prompt_encoders)))
                   if name in components}  # not loaded: text encoders only the empty negative would need
        sd = DiffusionPipeline.from_pretrained(source, dtype=dtype, **skipped, **hub_kwargs)
        text = {name: getattr(sd, name, None) for name in _with_tokenizers(family.empty_prompt_encoders)}
        return cls(gill_model=gill_model, processor=gill_model.processor, vae=sd.vae, scheduler=sd.scheduler,
                   retrieval_index=retrieval_index, **{family.denoiser: denoiser_of(sd)}, **text)

    @property
    def diffusion_layout(self) -> DiffusionLayout:
        """The target layout the denoiser consumes (:mod:`gill_hf.diffusion_layouts`)."""
        return layout_of_pipeline(self)

    @property
    def guidance_applies(self) -> bool:
        """Whether ``guidance_scale`` acts: classifier-free guidance (UNet families, SD3), or a Flux transformer with
        a guidance embedding (FLUX.1-dev; FLUX.1-schnell has none, so there it must stay None)."""
        family = FAMILIES[self.diffusion_layout.family]
        return family.classifier_free_guidance or bool(getattr(self.transformer.config, "guidance_embeds", False))

    @property
    def default_guidance_scale(self) -> float:
        """``guidance_scale=None``: the layout's diffusers pipeline default (7.5 SD 1.x / 2.x, 5.0 SDXL, 7.0 SD3,
        3.5 Flux)."""
        return FAMILIES[self.diffusion_layout.family].guidance_scale

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs):
        """diffusers' save (the GILL component writes only its adapter) + the retrieval index, if any, as one atomic
        save (:func:`gill_hf.atomic.atomic_folder`: a killed save leaves the previous pipeline in place)."""
        from .atomic import atomic_folder

        if kwargs.get("push_to_hub"):  # diffusers names the repo after the folder it writes: the target's name
            kwargs.setdefault("repo_id", os.path.basename(os.path.abspath(os.fspath(save_directory))))
        with atomic_folder(save_directory) as staging:
            super().save_pretrained(staging, **kwargs)
            if self.retrieval_index is not None:
                self.retrieval_index.save(os.path.join(staging, RETRIEVAL_FOLDER))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs):
        """Load a saved pipeline folder, or snapshot a Hub repo first (see the module docstring).

        The GILL component is loaded by :meth:`GILLForConditionalGeneration.from_pretrained` (backbones by id),
        the retrieval index from ``retrieval_index/`` (memory-mapped) unless passed.
        """
        path = os.fspath(pretrained_model_name_or_path)
        hub_keys = ("revision", "token", "cache_dir", "local_files_only")
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            path = snapshot_download(path, **{k: kwargs[k] for k in hub_keys if k in kwargs})
        kwargs = {k: v for k, v in kwargs.items() if k not in hub_keys}
        index_dir = os.path.join(path, RETRIEVAL_FOLDER)
        if "retrieval_index" not in kwargs and os.path.isdir(index_dir):  # checked before any weights load
            kwargs["retrieval_index"] = RetrievalIndex.load(index_dir)
            config = kwargs["gill_model"].config if "gill_model" in kwargs else \
                GILLConfig.from_pretrained(os.path.join(path, GILL_MODEL_FOLDER))
            try:
                _check_index_width(kwargs["retrieval_index"], config)
            except ValueError as err:
                raise ValueError(f"{index_dir}: {err}") from None
        if "gill_model" not in kwargs:
            kwargs["gill_model"] = GILLForConditionalGeneration.from_pretrained(
                os.path.join(path, GILL_MODEL_FOLDER), dtype=kwargs.get("dtype"))
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``; a pushed repo's remote-code entries (``["gill_remote", class]``, see
        :mod:`gill_hf.remote_code`) are read as the classes this module imported, so loading such a repo through
        this class runs none of the repo's code."""
        from .remote_code import local_model_index

        loaded = super().load_config(*args, **kwargs)
        classes = {c.__name__: c for c in (GILLPipeline, GILLForConditionalGeneration, GILLProcessor)}
        local_model_index(loaded[0] if isinstance(loaded, tuple) else loaded, classes)
        return loaded

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the pipeline (GILL adapter, diffusion model, retrieval index) with a gill_hf model card in one
        commit; see :func:`gill_hf.hub.push_to_hub` for the options."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    # ------------------------------------------------------------------ conditioning
    @torch.no_grad()
    def empty_prompt_embeds(self) -> torch.Tensor:
        """The diffusion text encoder's output for ``""`` ``(1, L, D)``, computed once and cached."""
        if self._empty_prompt_embeds is None:
            if self.text_encoder is None or self.tokenizer is None:
                raise ValueError("classifier-free guidance needs negative_prompt_embeds: this GILL model has no "
                                 "mapped-null embedding (cfg_dropout_prob=0) and the pipeline has no text_encoder/"
                                 "tokenizer to embed the empty prompt; pass negative_prompt_embeds or "
                                 "guidance_scale<=1")
            ids = self.tokenizer([""], padding="max_length", max_length=self.tokenizer.model_max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self._empty_prompt_embeds = self.text_encoder(ids.to(self.text_encoder.device))[0]
        return self._empty_prompt_embeds

    def encode_prompt(self, prompt, generator: torch.Generator | None = None, return_dict: bool = False,
                      **generation_kwargs):
        """Run GILL on interleaved prompt(s) -> the conditioning of every [IMG] block produced, as the tensors the
        layout's diffusers ``encode_prompt`` returns: ``(prompt_embeds, negative_prompt_embeds)`` ``(N_images, L,
        D)`` for Stable Diffusion, plus ``pooled_prompt_embeds, negative_pooled_prompt_embeds`` ``(N_images, P)``
        for SDXL and SD3, ``(prompt_embeds, pooled_prompt_embeds)`` for Flux (no negative: no CFG);
        ``return_dict=True`` gives them by name, as keyword arguments of that diffusers pipeline. Negatives are None
        for models without a mapped-null embedding (the diffusers pipeline then embeds ``""``, or uses zeros for
        SDXL). Use ``force_image_after=0`` to ask for an image outright."""
        generation = self._generate(prompt, generator, generation_kwargs)
        if not any(generation.images):
            raise ValueError("the model produced no [IMG] block: pass force_image_after=N or gen_scale_factor>1")
        conditioning = self._conditioning(generation.voken_states())
        return conditioning if return_dict else tuple(conditioning.values())

    def _conditioning(self, voken_states: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """``(N, r, f)`` voken states -> the layout's conditioning tensors by diffusers keyword name, in the order
        of its ``encode_prompt``."""
        model = self.gill_model
        prompt_embeds, negative = image_conditioning(model, voken_states)
        conditioning = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative}
        if model.config.gen_pooled_dim:
            with torch.no_grad():
                conditioning["pooled_prompt_embeds"] = model.gen_pooled_embeddings(prompt_embeds)
                conditioning["negative_pooled_prompt_embeds"] = \
                    None if negative is None else model.gen_pooled_embeddings(negative)
        return {name: conditioning[name] for name in FAMILIES[self.diffusion_layout.family].conditioning}

    # ------------------------------------------------------------------ call
    def _generate(self, prompt, generator, generation_kwargs) -> GILLGenerateOutput:
        samples = [prompt] if _is_single_prompt(prompt) else list(prompt)
        if not samples:
            raise ValueError("GILLPipeline got an empty batch of prompts")
        for i, sample in enumerate(samples):
            if not _has_text(sample):
                raise ValueError(f"prompt {i} has no text: GILL answers interleaved inputs with at least one text "
                                 f"part")
        for name, allowed in (("num_return_sequences", 1), ("return_dict_in_generate", True)):
            if generation_kwargs.get(name, allowed) != allowed:
                raise ValueError(f"GILLPipeline needs {name}={allowed}; call pipe.gill_model.generate directly "
                                 f"for other values")
        encoded = self.processor(samples, padding_side="left").to(self.gill_model.device)
        kwargs = {**generation_kwargs, "return_dict_in_generate": True}
        sampling = kwargs.get("do_sample", self.gill_model.generation_config.do_sample)
        if generator is None or not sampling:
            return self.gill_model.generate(**encoded, **kwargs)
        # transformers samples from the global RNG: seed a forked copy of it from ``generator``
        seed = int(torch.randint(0, 2 ** 62, (), generator=generator, device=generator.device))
        devices = [generator.device] if generator.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            return self.gill_model.generate(**encoded, **kwargs)

    @torch.no_grad()
    def __call__(self, prompt=None, *, prompt_embeds: torch.Tensor | None = None,
                 negative_prompt_embeds: torch.Tensor | None = None,
                 pooled_prompt_embeds: torch.Tensor | None = None,
                 negative_pooled_prompt_embeds: torch.Tensor | None = None,
                 decision: Literal["auto", "generate", "retrieve"] = "auto", decision_threshold: float | None = None,
                 num_candidates: int = 1, load_retrieved_images: bool = True,
                 num_inference_steps: int = 50, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil", callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs: list[str] = ("latents",), return_dict: bool = True,
                 **generation_kwargs):
        """Answer ``prompt`` (one interleaved list of str / PIL images, or a list of them) with text and images.

        Args:
            prompt_embeds / negative_prompt_embeds: precomputed GILL conditioning ``(N, L, D)``; skips the LLM
                and generates N images (``prompt`` must then be None).
            pooled_prompt_embeds / negative_pooled_prompt_embeds: ``(N, P)``, with ``prompt_embeds`` for layouts
                with a pooled vector (SDXL, SD3, Flux; SDXL's negative defaults to zeros as diffusers', SD3's to
                the encoding of ``""``; Flux takes no negatives), else None.
            decision: "auto" asks the decision head (needs a retrieval index; without one every image is
                generated), "generate" / "retrieve" force the mode.
            decision_threshold: P(retrieve) above which to retrieve (default ``config.decision_threshold``).
            num_candidates: top-k candidates returned per retrieved image.
            num_inference_steps, guidance_scale, height, width, generator, latents, output_type,
                callback_on_step_end, callback_on_step_end_tensor_inputs: as in Stable Diffusion; ``guidance_scale``
                defaults to the layout's diffusers pipeline default (7.5 for Stable Diffusion, 5.0 for SDXL, 7.0 for
                SD3, 3.5 for Flux, where it is the transformer's embedded guidance, not CFG; a Flux transformer
                without a guidance embedding, as FLUX.1-schnell, refuses one: see ``guidance_applies``).
                ``generator`` also drives LLM sampling.
            generation_kwargs: ``gill_model.generate`` options: every transformers one (``max_new_tokens``,
                ``do_sample``, ``temperature``, ``top_p``, ``num_beams``, ``stop_strings``, ``streamer``...) and
                GILL's (``force_image_after``, ``min_text_tokens``, ``max_images``, ``gen_scale_factor``, ...).
        """
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        family = FAMILIES[self.diffusion_layout.family]
        allowed = self._family_pipeline_class()._callback_tensor_inputs if family.denoiser == "transformer" \
            else self._callback_tensor_inputs
        bad = [k for k in callback_on_step_end_tensor_inputs if k not in allowed]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not in {allowed}")
        if guidance_scale is not None and not self.guidance_applies:
            raise ValueError(f"guidance_scale={guidance_scale} does not apply: this {type(self.transformer).__name__} "
                             f"has no guidance embedding (guidance_embeds=False, as FLUX.1-schnell); leave it None")
        if guidance_scale is None:
            guidance_scale = self.default_guidance_scale
        diffusion = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                         width=width, generator=generator, latents=latents, output_type=output_type,
                         callback_on_step_end=callback_on_step_end,
                         callback_tensor_inputs=list(callback_on_step_end_tensor_inputs))
        if num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        for name, side in (("height", height), ("width", width)):
            if side is not None and (side < 1 or side % self._size_multiple):
                raise ValueError(f"{name} must be a positive multiple of {self._size_multiple}, got {side}")
        if prompt_embeds is not None:
            if prompt is not None:
                raise ValueError("pass either prompt or prompt_embeds, not both")
            unused = [*generation_kwargs, *(name for name, value, default in (
                ("decision", decision, "auto"), ("decision_threshold", decision_threshold, None),
                ("num_candidates", num_candidates, 1), ("load_retrieved_images", load_retrieved_images, True))
                if value != default)]
            if unused:
                raise ValueError(f"prompt_embeds skips the LLM and the decision: {sorted(unused)} do not apply")
            images = self._diffuse(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
                                   negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, **diffusion)
            parts = [ImagePart("generated", image, Decision("gen", 0.0, 1.0, forced=True)) for image in images]
            images = [p.image for p in parts]
            return GILLPipelineOutput(parts=parts, images=images) if return_dict else (parts, images)
        if prompt is None:
            raise ValueError("GILLPipeline needs a prompt (or prompt_embeds)")
        if decision not in ("auto", "generate", "retrieve"):
            raise ValueError(f"decision must be 'auto', 'generate' or 'retrieve', got {decision!r}")
        if decision == "retrieve" and self.retrieval_index is None:
            raise ValueError("decision='retrieve' needs a retrieval_index on the pipeline")
        if pooled_prompt_embeds is not None or negative_pooled_prompt_embeds is not None:
            raise ValueError("pooled_prompt_embeds and negative_pooled_prompt_embeds go with prompt_embeds; for a "
                             "prompt they come from the model")
        self._check_answer_options(negative_prompt_embeds, decision, decision_threshold, num_candidates)

        generation = self._generate(prompt, generator, generation_kwargs)
        slots = [s for row in generation.images for s in row]
        slot_rows = [b for b, row in enumerate(generation.images) for _ in row]
        image_parts = self._answer_images(slots, slot_rows, generation, decision, decision_threshold,
                                          num_candidates, load_retrieved_images, diffusion) if slots else {}
        parts = [[image_parts[id(p)] if isinstance(p, GeneratedImageSlot) else p for p in row]
                 for row in generation.parts]
        images = [p.image for row in parts for p in row if isinstance(p, ImagePart)]
        parts = parts[0] if _is_single_prompt(prompt) else parts
        if not return_dict:
            return (parts, images)
        return GILLPipelineOutput(parts=parts, images=images, generation=generation)

    def _check_answer_options(self, negative_prompt_embeds, decision, threshold, num_candidates):
        """Options of an answer that its decision mode and retrieval index could not honour raise."""
        if negative_prompt_embeds is not None:
            raise ValueError("negative_prompt_embeds goes with prompt_embeds; for a prompt the negative comes from "
                             "the model (mapped null) or the text encoder's empty prompt")
        if num_candidates < 1:
            raise ValueError(f"num_candidates must be >= 1, got {num_candidates}")
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise ValueError(f"decision_threshold must lie in [0, 1], got {threshold}")
        if threshold is not None and (decision != "auto" or self.retrieval_index is None):
            raise ValueError("decision_threshold applies to decision='auto' with a retrieval_index; here every image "
                             f"is {'retrieved' if decision == 'retrieve' else 'generated'}")

    def _answer_images(self, slots, slot_rows, generation, decision_mode, threshold, num_candidates,
                       load_retrieved, diffusion) -> dict[int, ImagePart]:
        """Decide, retrieve and generate for every [IMG] block; returns ImageParts keyed by ``id(slot)``.

        As the original, an image retrieved earlier in the same answer is not retrieved again.
        """
        model = self.gill_model
        img0 = generation.img0_hidden_states()  # (N, f)
        scores = indices = None
        if self.retrieval_index is not None:
            query = model.text_retrieval_embeddings(img0)  # (N, p)
            most_per_answer = max(slot_rows.count(b) for b in set(slot_rows))
            scores, indices = self.retrieval_index.search(query, k=max(num_candidates, 1) + most_per_answer - 1)
        if decision_mode == "auto" and self.retrieval_index is not None:
            max_cosine = scores[:, 0] / math.exp(self.retrieval_index.logit_scale)
            decisions = decide(model, img0, max_cosine, threshold)
        else:
            label = "ret" if decision_mode == "retrieve" else "gen"
            decisions = [Decision(label, float(label == "ret"), 0.5, forced=True) for _ in slots]

        out = {}
        gen_rows = [i for i, d in enumerate(decisions) if d.mode == "gen"]
        if gen_rows:
            voken = torch.stack([slots[i].voken_states for i in gen_rows])  # (G, r, f)
            images = self._diffuse(**self._conditioning(voken), **diffusion)
            for i, image in zip(gen_rows, images):
                out[id(slots[i])] = ImagePart("generated", image, decisions[i])
        shown = {b: set() for b in slot_rows}  # candidate rows already retrieved in each answer
        for i, d in enumerate(decisions):
            if d.mode != "ret":
                continue
            ranked = list(zip(indices[i].tolist(), scores[i].tolist()))
            fresh = [(j, s) for j, s in ranked if j not in shown[slot_rows[i]]] or ranked  # tiny index: repeat
            shown[slot_rows[i]].add(fresh[0][0])
            candidates = [(self.retrieval_index.paths[j], float(s)) for j, s in fresh[:num_candidates]]
            path, score = candidates[0]
            image = load_image(path) if load_retrieved and os.path.isfile(path) else None
            out[id(slots[i])] = ImagePart("retrieved", image, d, score=score, path=path, candidates=candidates)
        return out

    # ------------------------------------------------------------------ diffusion
    @staticmethod
    def _check_pooled(layout, prompt_embeds, pooled, negative_pooled):
        """Pooled vectors are given exactly for layouts that take one, ``(N, P)`` as ``prompt_embeds``' N."""
        if layout.pooled_dim is None:
            if pooled is not None or negative_pooled is not None:
                raise ValueError(f"the {layout} layout takes no pooled_prompt_embeds / negative_pooled_prompt_embeds")
            return
        if pooled is None:
            raise ValueError(f"the {layout} layout needs pooled_prompt_embeds (N, {layout.pooled_dim}) with "
                             f"prompt_embeds")
        expected = (prompt_embeds.shape[0], layout.pooled_dim)
        for name, tensor in (("pooled_prompt_embeds", pooled), ("negative_pooled_prompt_embeds", negative_pooled)):
            if tensor is not None and tuple(tensor.shape) != expected:
                raise ValueError(f"{name} must be {expected} for the {layout} layout, got {tuple(tensor.shape)}")

    @staticmethod
    def _added_conditioning(pooled, negative_pooled, height, width, do_cfg, device, dtype) -> dict | None:
        """SDXL's ``added_cond_kwargs``: pooled text vectors and the size / crop ``time_ids`` (original = target
        size ``(height, width)``, no crop, as diffusers' defaults); None for layouts without a pooled vector."""
        if pooled is None:
            return None
        pooled = pooled.to(device=device, dtype=dtype)
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], device=device, dtype=dtype)
        time_ids = time_ids.repeat(pooled.shape[0], 1)  # (N, 6)
        if do_cfg:
            negative = torch.zeros_like(pooled) if negative_pooled is None else negative_pooled.to(pooled)
            pooled, time_ids = torch.cat([negative, pooled]), torch.cat([time_ids, time_ids])
        return {"text_embeds": pooled, "time_ids": time_ids}

    @property
    def _size_multiple(self) -> int:
        """Image sides are multiples of this: the VAE's factor times the transformer's patch (Flux: its 2 x 2
        packing)."""
        if FAMILIES[self.diffusion_layout.family].packed_latents:
            return self.vae_scale_factor * 2
        return self.vae_scale_factor * (self.transformer.config.patch_size if self.transformer is not None else 1)

    def _family_pipeline_class(self) -> type:
        return getattr(diffusers, FAMILIES[self.diffusion_layout.family].pipeline_class)

    def _diffuse(self, prompt_embeds, negative_prompt_embeds=None, *, pooled_prompt_embeds=None,
                 negative_pooled_prompt_embeds=None, **diffusion) -> list:
        """``(G, L, D)`` embeddings (+ ``(G, P)`` pooled for layouts with one) -> G images (PIL / np / pt rows, or
        latents), through the UNet loop or the transformer family's diffusers pipeline."""
        layout = self.diffusion_layout
        if prompt_embeds.dim() != 3 or prompt_embeds.shape[-1] != layout.sequence_dim:
            raise ValueError(f"prompt_embeds must be (N, L, {layout.sequence_dim}) for the {layout} layout, got "
                             f"{tuple(prompt_embeds.shape)}")
        self._check_pooled(layout, prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds)
        family = FAMILIES[layout.family]
        if not family.classifier_free_guidance and (negative_prompt_embeds is not None
                                                    or negative_pooled_prompt_embeds is not None):
            raise ValueError(f"the {layout} layout has no classifier-free guidance: negative_prompt_embeds / "
                             f"negative_pooled_prompt_embeds do not apply (guidance_scale is embedded)")
        if family.denoiser == "transformer":
            return self._diffuse_with_family_pipeline(family, prompt_embeds, negative_prompt_embeds,
                                                      pooled_prompt_embeds, negative_pooled_prompt_embeds, **diffusion)
        return self._denoise_with_unet(prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                       negative_pooled_prompt_embeds, **diffusion)

    def _diffuse_with_family_pipeline(self, family, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                                      negative_pooled_prompt_embeds, *, num_inference_steps, guidance_scale, height,
                                      width, generator, latents, output_type, callback_on_step_end,
                                      callback_tensor_inputs) -> list:
        """Transformer layouts: their diffusers pipeline (flow-matching loop, SD3's CFG over the encoding of ``""``
        when no negative is given, Flux's packed latents and embedded guidance) on these components."""
        if negative_pooled_prompt_embeds is not None and negative_prompt_embeds is None:
            raise ValueError("negative_pooled_prompt_embeds needs negative_prompt_embeds as well")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match "
                             f"prompt_embeds {tuple(prompt_embeds.shape)}")
        needs_text = family.classifier_free_guidance and guidance_scale > 1 and negative_prompt_embeds is None
        missing = [name for name in family.empty_prompt_encoders if needs_text and getattr(self, name) is None]
        if missing:
            raise ValueError(f"classifier-free guidance needs negative_prompt_embeds: this GILL model has no "
                             f"mapped-null embedding (cfg_dropout_prob=0) and the pipeline lacks {missing} to embed "
                             f"the empty prompt; pass negative_prompt_embeds or guidance_scale<=1")
        pipeline_class = self._family_pipeline_class()
        names = [name for name in inspect.signature(pipeline_class.__init__).parameters if name != "self"]
        pipe = pipeline_class(**{name: getattr(self, name, None) for name in names})
        pipe.set_progress_bar_config(**getattr(self, "_progress_bar_config", {}))
        denoiser = self.transformer
        conditioning = {name: None if tensor is None else tensor.to(device=denoiser.device, dtype=denoiser.dtype)
                        for name, tensor in (("prompt_embeds", prompt_embeds),
                                             ("negative_prompt_embeds", negative_prompt_embeds),
                                             ("pooled_prompt_embeds", pooled_prompt_embeds),
                                             ("negative_pooled_prompt_embeds", negative_pooled_prompt_embeds))
                        if name in family.conditioning}
        if needs_text:  # the encoding of "" as long as the prompt's: CLIP's 77 tokens, then T5's
            t5_length = prompt_embeds.shape[1] - (family.sequence_length - family.t5_length)
            if t5_length < 1:
                raise ValueError(f"the empty negative of the {self.diffusion_layout} layout needs prompt_embeds "
                                 f"longer than its CLIP part ({family.sequence_length - family.t5_length} tokens), "
                                 f"got L={prompt_embeds.shape[1]}; pass negative_prompt_embeds")
            conditioning["max_sequence_length"] = t5_length
        images = pipe(**conditioning, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                      height=height, width=width, generator=generator, latents=latents, output_type=output_type,
                      callback_on_step_end=callback_on_step_end,
                      callback_on_step_end_tensor_inputs=callback_tensor_inputs, return_dict=False)[0]
        self.maybe_free_model_hooks()
        return list(images)

    def _denoise_with_unet(self, prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds,
                           negative_pooled_prompt_embeds, *, num_inference_steps, guidance_scale, height, width,
                           generator, latents, output_type, callback_on_step_end, callback_tensor_inputs) -> list:
        """The UNet denoising loop (SD 1.x / 2.x, SDXL)."""
        layout = self.diffusion_layout
        device, dtype = self.unet.device, self.unet.dtype
        do_cfg = guidance_scale > 1.0
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        if do_cfg:
            if negative_prompt_embeds is None and FAMILIES[layout.family].zero_empty_prompt:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
            elif negative_prompt_embeds is None:
                negative_prompt_embeds = self.empty_prompt_embeds().expand_as(prompt_embeds)
            if negative_prompt_embeds.shape != prompt_embeds.shape:
                raise ValueError(f"negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must match "
                                 f"prompt_embeds {tuple(prompt_embeds.shape)}")
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(f"height and width must be multiples of {self.vae_scale_factor}, got {height}x{width}")

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        shape = (prompt_embeds.shape[0], self.unet.config.in_channels, height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma
        added_cond = self._added_conditioning(pooled_prompt_embeds, negative_pooled_prompt_embeds, height, width,
                                              do_cfg, device, dtype)
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters \
            else {}

        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                model_input = torch.cat([latents] * 2) if do_cfg else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                context = torch.cat([negative_prompt_embeds, prompt_embeds]) if do_cfg else prompt_embeds
                noise_pred = self.unet(model_input, t, encoder_hidden_states=context, added_cond_kwargs=added_cond,
                                       return_dict=False)[0]
                if do_cfg:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
                latents = self.scheduler.step(noise_pred, t, latents, **step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents, "prompt_embeds": prompt_embeds,
                               "negative_prompt_embeds": negative_prompt_embeds}
                    updates = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_tensor_inputs})
                    latents = updates.pop("latents", latents)
                    prompt_embeds = updates.pop("prompt_embeds", prompt_embeds)
                    negative_prompt_embeds = updates.pop("negative_prompt_embeds", negative_prompt_embeds)
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False,
                                      generator=generator)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        return list(images)
