"""The models under evaluation: GILL through :class:`GILLPipeline` (an image forced right after the context) and
the plain Stable Diffusion pipeline of the same checkpoint on the context's text (the paper's baseline).

Both share one loaded diffusion model; every image is seeded by its own ``torch.Generator().manual_seed(seed)``
(on CPU, so a seed gives the same latents on any device). :meth:`EvaluatedModels.answer_settings` lists what makes
an answer (the models' identities and options), the record that ties stored answers to their settings.
"""

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from PIL import Image

from ..modeling_gill import GILLForConditionalGeneration
from ..pipeline_gill import GILLPipeline
from .contexts import context_text


@dataclass
class DiffusionSettings:
    """Denoising options shared by both models (the original evaluation: 50 steps, guidance 7.5)."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str | None = None  # None: the checkpoint's; "ddim": DDIMScheduler (the paper's FID protocol)


class EvaluatedModels:
    """A GILL model + its diffusion model loaded once; ``gill(context, seed)`` / ``stable_diffusion(context, seed)``
    return one PIL image each."""

    def __init__(self, model: GILLForConditionalGeneration, settings: DiffusionSettings | None = None,
                 diffusion_model: str | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None):
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        self.model, self.settings = model.to(device), settings or DiffusionSettings()
        self._weight_digests: dict[str, tuple] = {}  # part -> (tensor identities and versions, sha256)
        source = diffusion_model or model.config.diffusion_model_name_or_path
        if not source:
            raise ValueError("the GILL config names no diffusion model; pass diffusion_model=")
        self.diffusion_source = source
        sd = StableDiffusionPipeline.from_pretrained(source, dtype=dtype, safety_checker=None,
                                                     requires_safety_checker=False).to(device)
        if self.settings.scheduler == "ddim":
            sd.scheduler = DDIMScheduler.from_config(sd.scheduler.config)
        elif self.settings.scheduler is not None:
            raise ValueError(f"unknown scheduler {self.settings.scheduler!r}; use None or 'ddim'")
        sd.set_progress_bar_config(disable=True)
        self.sd = sd
        self.pipe = GILLPipeline(gill_model=model, processor=model.processor, unet=sd.unet, vae=sd.vae,
                                 scheduler=sd.scheduler, text_encoder=sd.text_encoder, tokenizer=sd.tokenizer)
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def load(cls, model_path: str, device: str = "cpu", dtype: torch.dtype | None = None, **kwargs
             ) -> "EvaluatedModels":
        """From a saved GILL folder or Hub id (``GILLForConditionalGeneration.from_pretrained``)."""
        return cls(GILLForConditionalGeneration.from_pretrained(model_path, dtype=dtype), device=device,
                   dtype=dtype, **kwargs)

    ANSWER_KINDS = ("gill", "sd", "gill_text")

    def answer_settings(self, kind: str, **generation) -> dict:
        """What makes one answer of ``kind``: "sd" (Stable Diffusion's images: the diffusion model's identity and
        options only, so baseline answers stay valid across GILL models), "gill" (images or responses: GILL's
        identity and the diffusion's) or "gill_text" (texts, no diffusion: GILL's identity); plus ``generation``
        (e.g. ``max_new_tokens``, ``stop``, ``prompt_format``) as given. JSON-able (see ``ImageStore.claim``)."""
        if kind not in self.ANSWER_KINDS:
            raise ValueError(f"unknown answer kind {kind!r}; choose from {list(self.ANSWER_KINDS)}")
        parts = {"gill": (self._gill_identity, self._diffusion_identity), "sd": (self._diffusion_identity,),
                 "gill_text": (self._gill_identity,)}[kind]
        return {"answers": kind, **{k: v for part in parts for k, v in part().items()}, **generation}

    def _gill_identity(self) -> dict:
        """The GILL model: where it was loaded from, its config and generation config, its trained tensors
        (adapter, LoRA), the LLM's dtype; the frozen backbones are named by the config."""
        config = self.model.config.to_dict()
        for volatile in ("_name_or_path", "transformers_version"):
            config.pop(volatile, None)
        config = [config, json.loads(self.model.generation_config.to_json_string(use_diff=True,
                                                                                  ignore_metadata=True))]
        trained = [*self.model.adapter.state_dict(keep_vars=True).items(),
                   *((name, p) for name, p in self.model.language_model.named_parameters() if "lora_" in name)]
        return {"gill_model": _source_name(self.model.config._name_or_path) or "(in memory)",
                "gill_config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()
                                                     ).hexdigest(),
                "gill_weights_sha256": self._weights_sha256("gill", trained),
                "gill_dtype": str(self.model.language_model.dtype)}

    def _diffusion_identity(self) -> dict:
        """The diffusion model (source, weights of UNet / VAE / text encoder, scheduler, dtype, output size in
        pixels) and the denoising options."""
        sd = self.sd
        scheduler = json.dumps([type(sd.scheduler).__name__, dict(sd.scheduler.config)], sort_keys=True, default=str)
        weights = [(f"{name}.{key}", value) for name in ("unet", "vae", "text_encoder")
                   for key, value in getattr(sd, name).state_dict(keep_vars=True).items()]
        size = sd.unet.config.sample_size * sd.vae_scale_factor
        return {"diffusion_model": _source_name(self.diffusion_source),
                "diffusion_weights_sha256": self._weights_sha256("diffusion", weights),
                "scheduler": self.settings.scheduler,
                "scheduler_config_sha256": hashlib.sha256(scheduler.encode()).hexdigest(),
                "num_inference_steps": self.settings.num_inference_steps,
                "guidance_scale": self.settings.guidance_scale, "diffusion_dtype": str(sd.unet.dtype),
                "image_size": [size, size]}

    def _weights_sha256(self, part: str, named: list[tuple[str, torch.Tensor]]) -> str:
        """:func:`tensors_sha256` of ``named``, kept until a tensor is replaced (its storage, dtype, device or shape
        change, as ``module.half()`` or ``p.data = ...`` do) or changed in place through autograd-visible ops (its
        version counter moves), so a run hashes each model once however many rows it records. An in-place edit of
        ``p.data`` is invisible to both; hash afresh (a new EvaluatedModels) after one."""
        key = tuple((name, id(tensor), tensor.data_ptr(), tensor.dtype, tensor.device, tuple(tensor.shape),
                     tensor._version) for name, tensor in named)
        cached = self._weight_digests.get(part)
        if cached is None or cached[0] != key:
            cached = self._weight_digests[part] = (key, tensors_sha256(named))
        return cached[1]

    def _denoise_kwargs(self, seed: int) -> dict:
        return {"num_inference_steps": self.settings.num_inference_steps,
                "guidance_scale": self.settings.guidance_scale, "generator": torch.Generator().manual_seed(seed)}

    def gill(self, context: list, seed: int) -> Image.Image:
        """GILL's image for an interleaved context: [IMG0..r-1] forced right after it, always generated."""
        out = self.pipe(context, decision="generate", force_image_after=0,
                        max_new_tokens=self.model.config.num_img_tokens, **self._denoise_kwargs(seed))
        return out.images[0]

    def gill_text(self, context: list, max_new_tokens: int = 32, stop: str | None = None) -> str:
        """GILL's greedy text continuation of a context, with no image (``max_images=0``); generation ends at
        ``stop`` (a stop string, e.g. MiniGPT-5's ``###``), which is cut from the text with what follows it."""
        out = self.pipe(context, max_images=0, max_new_tokens=max_new_tokens, do_sample=False,
                        **self._stop_kwargs(stop))
        return _answer_text(out.parts, stop)

    def gill_response(self, context: list, seed: int, max_new_tokens: int = 32, stop: str | None = None
                      ) -> tuple[str, Image.Image | None]:
        """GILL's free answer to a context: its greedy text (ended at ``stop`` as in :meth:`gill_text`) and its
        first image (generated), or None."""
        out = self.pipe(context, decision="generate", max_images=1, max_new_tokens=max_new_tokens, do_sample=False,
                        **self._stop_kwargs(stop), **self._denoise_kwargs(seed))
        return _answer_text(out.parts, stop), (out.images or [None])[0]

    def _stop_kwargs(self, stop: str | None) -> dict:
        """``generate``'s stop-string options (transformers needs the tokenizer to match strings)."""
        if stop is None:
            return {}
        if not isinstance(stop, str) or not stop.strip():
            raise ValueError(f"stop must be a non-empty string or None, got {stop!r}")
        return {"stop_strings": [stop], "tokenizer": self.model.processor.tokenizer}

    def stable_diffusion(self, context: list, seed: int) -> Image.Image:
        """Stable Diffusion's image for the context's text (images dropped; its tokenizer truncates at 77)."""
        return self.sd(context_text(context), **self._denoise_kwargs(seed)).images[0]


def _answer_text(parts: list, stop: str | None) -> str:
    """The text parts of an answer joined, cut before the first ``stop``, stripped."""
    text = "".join(part for part in parts if isinstance(part, str))
    return (text.split(stop, 1)[0] if stop else text).strip()


def _source_name(source: str) -> str:
    """A local folder as its absolute path (the same folder however it was named), a Hub id as it is."""
    return os.path.abspath(source) if source and os.path.isdir(source) else source


def tensors_sha256(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of each tensor in name order: changes whenever a value does."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda item: item[0]):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy())
    return digest.hexdigest()
