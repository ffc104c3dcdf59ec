"""Metrics of the paper's evaluations: CLIP image-image cosine, LPIPS and FID (torchmetrics), Recall@k.

* :class:`ClipImageEmbedder` loads any CLIP image tower: a transformers checkpoint (``CLIPModel`` or
  ``CLIPVisionModelWithProjection``: projected image embeds; a plain ``CLIPVisionModel``: its pooled output) or an
  open_clip model (``hf-hub:<repo>`` or ``open_clip:<arch>[/<pretrained tag or file>]``); with ``with_text=True``
  a full CLIP / open_clip also embeds texts (``embed_text``, MiniGPT-5's CLIP-T and MM-Relevance).
* :class:`LPIPSScorer` wraps torchmetrics' ``LearnedPerceptualImagePatchSimilarity`` (AlexNet by default, both
  images resized to 256 x 256 as the original). torchmetrics builds the backbone with ImageNet weights that
  torchvision downloads once into ``$TORCH_HOME/hub/checkpoints``; offline, put the file there first or pass
  ``metric=`` (any module taking two ``(N, 3, H, W)`` batches in [-1, 1] and returning ``(N,)`` distances).
* :func:`frechet_distance` wraps torchmetrics' ``FrechetInceptionDistance``; its default InceptionV3 needs the
  torch-fidelity weights (downloaded on first use); ``feature=`` takes any ``nn.Module`` mapping uint8 images
  ``(N, 3, 299, 299)`` to ``(N, d)`` features. Its reference statistics can be saved and loaded
  (``save_reference`` / ``load_reference``, safetensors).
"""

from collections.abc import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..atomic import atomic_path
from ..processing_gill import load_image, to_rgb

DEFAULT_CLIP = "openai/clip-vit-large-patch14"
LPIPS_SIZE = 256  # the original resized both images to 256 x 256 before LPIPS
FID_SIZE = 299  # InceptionV3's input size; every image is resized to it before the feature extractor


def _rgb(image) -> Image.Image:
    return to_rgb(load_image(image))


def mean_std(values: Sequence[float]) -> dict:
    """``{"mean", "std", "values"}`` over seeds (sample std, 0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "values": [float(v) for v in array]}


class ClipImageEmbedder:
    """``embed(images)`` -> ``(N, d)`` float32 CLIP image embeddings (unnormalised) on CPU."""

    def __init__(self, name: str = DEFAULT_CLIP, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 batch_size: int = 32, with_text: bool = False):
        self.name, self.device, self.batch_size = name, torch.device(device), batch_size
        if name.startswith(("hf-hub:", "open_clip:")):
            self._load_open_clip(name, dtype)
        else:
            self._load_transformers(name, dtype)
        if with_text:
            self._load_tokenizer()

    def _load_transformers(self, name: str, dtype):
        from transformers import (
            AutoConfig,
            AutoImageProcessor,
            CLIPModel,
            CLIPVisionModel,
            CLIPVisionModelWithProjection,
        )

        config = AutoConfig.from_pretrained(name)
        if config.model_type == "clip":  # a full CLIP: its image features (the projected embeddings)
            model_class, self.kind = CLIPModel, "clip"
        elif "CLIPVisionModelWithProjection" in (config.architectures or []):
            model_class, self.kind = CLIPVisionModelWithProjection, "projected"
        else:  # a plain CLIPVisionModel has no projection: its pooled output
            model_class, self.kind = CLIPVisionModel, "pooled"
        self.model = model_class.from_pretrained(name, dtype=dtype).to(self.device).eval()
        self.image_processor = AutoImageProcessor.from_pretrained(name, backend="pil")

    def _load_open_clip(self, name: str, dtype):
        try:
            import open_clip
        except ImportError as err:
            raise ImportError(f"--clip-model {name} needs open_clip (pip install open_clip_torch)") from err
        if name.startswith("hf-hub:"):
            model, _, preprocess = open_clip.create_model_and_transforms(name)
        else:
            arch, _, pretrained = name.removeprefix("open_clip:").partition("/")
            model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained or None)
        self.model = model.to(self.device, dtype=dtype).eval()
        self.preprocess, self.kind = preprocess, "open_clip"

    def _load_tokenizer(self):
        """The text side for :meth:`embed_text`: a full CLIP's tokenizer, or open_clip's."""
        if self.kind == "open_clip":
            import open_clip

            arch = self.name.removeprefix("open_clip:").partition("/")[0]
            self.tokenizer = open_clip.get_tokenizer(self.name if self.name.startswith("hf-hub:") else arch)
        elif self.kind == "clip":
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(self.name)
        else:
            raise ValueError(f"CLIP model {self.name} is an image tower only; CLIP-T needs a full CLIP "
                             f"(a transformers CLIPModel or an open_clip model)")

    @torch.no_grad()
    def _embed_batch(self, images: list[Image.Image]) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        if self.kind == "open_clip":
            pixels = torch.stack([self.preprocess(im) for im in images]).to(self.device, dtype)
            return self.model.encode_image(pixels).float().cpu()
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"].to(self.device, dtype)
        if self.kind == "clip":
            out = self.model.get_image_features(pixel_values=pixels)
            features = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            out = self.model(pixel_values=pixels)
            features = out.image_embeds if self.kind == "projected" else out.pooler_output
        return features.float().cpu()

    def embed(self, images: Iterable) -> torch.Tensor:
        images = [_rgb(im) for im in images]
        if not images:
            raise ValueError("no images to embed")
        return torch.cat([self._embed_batch(images[i:i + self.batch_size])
                          for i in range(0, len(images), self.batch_size)])


    @torch.no_grad()
    def _embed_text_batch(self, texts: list[str]) -> torch.Tensor:
        if self.kind == "open_clip":
            return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()
        tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        out = self.model.get_text_features(**tokens)
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).float().cpu()

    def embed_text(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, d)`` float32 CLIP text embeddings (unnormalised), in the image embeddings' space; needs
        ``with_text=True`` (long texts are cut at the tokenizer's context length, 77 for CLIP)."""
        if not hasattr(self, "tokenizer"):
            raise ValueError("build the ClipImageEmbedder with with_text=True to embed texts")
        texts = list(texts)
        if not texts:
            raise ValueError("no texts to embed")
        return torch.cat([self._embed_text_batch(texts[i:i + self.batch_size])
                          for i in range(0, len(texts), self.batch_size)])


def cosine_similarities(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine of two ``(N, d)`` embedding batches -> ``(N,)``."""
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def _signed_pixels(images: Sequence, size: int) -> torch.Tensor:
    """PIL images -> ``(N, 3, size, size)`` float in [-1, 1] (bicubic resize)."""
    arrays = [np.asarray(_rgb(im).resize((size, size), Image.BICUBIC), dtype=np.float32) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


class LPIPSScorer:
    """``scores(generated, reference)`` -> ``(N,)`` LPIPS distances (lower = more similar)."""

    def __init__(self, net_type: str = "alex", device: str | torch.device = "cpu", metric=None,
                 size: int = LPIPS_SIZE):
        if metric is None:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction="none").net
        self.net, self.device, self.size = metric.to(device).eval(), torch.device(device), size

    @torch.no_grad()
    def scores(self, generated: Sequence, reference: Sequence) -> torch.Tensor:
        if len(generated) != len(reference):
            raise ValueError(f"{len(generated)} generated but {len(reference)} reference images")
        a = _signed_pixels(generated, self.size).to(self.device)
        b = _signed_pixels(reference, self.size).to(self.device)
        return self.net(a, b).reshape(-1).float().cpu()


def uint8_pixels(images: Sequence, size: int = FID_SIZE) -> torch.Tensor:
    """PIL images -> ``(N, 3, size, size)`` uint8 (bilinear resize), FrechetInceptionDistance's input."""
    arrays = [np.asarray(_rgb(im).resize((size, size), Image.BILINEAR), dtype=np.uint8) for im in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


REFERENCE_STATES = ("real_features_sum", "real_features_cov_sum", "real_features_num_samples")


class FIDScorer:
    """FID between a fixed reference set and several generated sets (torchmetrics, real statistics kept).

    ``add_reference(images)`` in batches, then ``score(batches_of_generated_images)`` once per generated set.
    ``feature``: None for torchmetrics' InceptionV3 pool features (2048), or any ``nn.Module`` as above.
    """

    def __init__(self, feature: torch.nn.Module | None = None, device: str | torch.device = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        self.metric = FrechetInceptionDistance(feature=2048 if feature is None else feature,
                                               reset_real_features=False).to(device)
        self.device, self.num_reference = torch.device(device), 0

    def add_reference(self, images: Sequence):
        self.metric.update(uint8_pixels(images).to(self.device), real=True)
        self.num_reference += len(images)

    def clear_reference(self):
        """Forget the reference statistics (before another reference set)."""
        for name in REFERENCE_STATES:
            setattr(self.metric, name, torch.zeros_like(getattr(self.metric, name)))
        self.num_reference = 0

    def save_reference(self, path: str):
        """The reference statistics (feature sum, covariance sum, count) as a safetensors file, written atomically."""
        from safetensors.torch import save_file

        with atomic_path(path, ".safetensors") as tmp:
            save_file({name: getattr(self.metric, name).cpu().contiguous() for name in REFERENCE_STATES}, tmp)

    def load_reference(self, path: str):
        """Reference statistics saved by :meth:`save_reference` (their feature width must match)."""
        from safetensors.torch import load_file

        saved, width = load_file(path), self.metric.real_features_sum.shape
        if set(saved) != set(REFERENCE_STATES) or saved["real_features_sum"].shape != width:
            raise ValueError(f"{path}: not FID reference statistics of this feature extractor (expected "
                             f"{list(REFERENCE_STATES)} of width {width[0]})")
        for name in REFERENCE_STATES:
            setattr(self.metric, name, saved[name].to(self.device))
        self.num_reference = int(saved["real_features_num_samples"])

    def score(self, generated_batches: Iterable[Sequence]) -> float:
        self.metric.reset()  # clears the generated statistics only
        count = 0
        for batch in generated_batches:
            self.metric.update(uint8_pixels(batch).to(self.device), real=False)
            count += len(batch)
        if count < 2 or self.num_reference < 2:
            raise ValueError(f"FID needs at least 2 generated and 2 reference images, got {count} and "
                             f"{self.num_reference}")
        return float(self.metric.compute())


def recall_at_k(ranked: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict[str, float]:
    """``ranked`` ``(Q, K)`` candidate indices best first, ``targets`` ``(Q,)`` -> ``{"R@k": percent}``."""
    hits = ranked == targets.reshape(-1, 1)  # (Q, K)
    return {f"R@{k}": float(hits[:, :k].any(dim=1).float().mean() * 100) for k in ks}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def parse_dtype(name: str | None) -> torch.dtype | None:
    """"float32" / "bfloat16" / "float16" (or None) -> torch dtype."""
    if name in (None, "auto"):
        return None
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
              "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise ValueError(f"unknown dtype {name!r}; choose from {sorted(dtypes)}")
    return dtypes[name]


__all__ = ["ClipImageEmbedder", "FIDScorer", "LPIPSScorer", "cosine_similarities", "default_device", "mean_std",
           "parse_dtype", "recall_at_k", "uint8_pixels"]
