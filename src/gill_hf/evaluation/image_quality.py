"""MiniGPT-5's image metrics over generated sets: CLIP-I (cosine to the ground-truth image), CLIP-T (cosine to the
ground-truth caption), Inception Score and FID (torchmetrics), each computed per seed over all examples and reported
as mean ± std over seeds.

FID's reference statistics (feature sum, covariance sum, count) are cached in ``cache_dir`` under a key made of the
feature extractor's name and the reference images (absolute path, size and modification time of each), so a second
run, of this model or another, reads them instead of embedding the reference set again.
"""

import hashlib
import json
import os
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from .contexts import ImageExample
from .image_benchmark import MODEL_NAMES, Row, batches
from .metrics import ClipImageEmbedder, FIDScorer, cosine_similarities, mean_std, uint8_pixels

INCEPTION_FEATURE = "inception-v3-2048"  # torchmetrics' default FID features (torch-fidelity weights)


class InceptionScorer:
    """Inception Score of a generated set: torchmetrics ``InceptionScore`` (mean over ``splits``; the shuffle into
    splits is drawn from ``seed``, so a score is reproducible).

    ``feature``: None for torchmetrics' InceptionV3 unbiased logits (torch-fidelity weights, downloaded once), or
    any ``nn.Module`` mapping uint8 ``(N, 3, 299, 299)`` images to ``(N, classes)`` logits.
    """

    def __init__(self, feature: torch.nn.Module | None = None, splits: int = 10, device: str | torch.device = "cpu",
                 seed: int = 0):
        if splits < 2:
            raise ValueError(f"Inception Score splits must be >= 2 (torchmetrics reports their std), got {splits}")
        self.seed = seed
        self.feature, self.splits, self.device = feature, splits, torch.device(device)

    def _metric(self):
        from torchmetrics.image.inception import InceptionScore

        with warnings.catch_warnings():  # its constructor always warns that features are kept in memory
            warnings.filterwarnings("ignore", message="Metric `InceptionScore` will save all extracted features")
            return InceptionScore(feature="logits_unbiased" if self.feature is None else self.feature,
                                  splits=self.splits).to(self.device)

    def score(self, image_batches: Iterable[Sequence]) -> float:
        metric, count = self._metric(), 0
        for batch in image_batches:
            metric.update(uint8_pixels(batch).to(self.device))
            count += len(batch)
        if count < self.splits:
            raise ValueError(f"Inception Score over {self.splits} splits needs at least {self.splits} images, "
                             f"got {count} (lower the splits)")
        with torch.random.fork_rng(devices=[]):  # torchmetrics shuffles the images into splits: seeded here
            torch.manual_seed(self.seed)
            return float(metric.compute()[0])


def reference_key(images: Sequence[str], feature_name: str) -> str:
    """A short hash of the feature extractor's name and each reference image's absolute path, size and mtime."""
    entries = []
    for path in images:
        stat = os.stat(path)
        entries.append([os.path.abspath(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps([feature_name, entries]).encode()).hexdigest()[:20]


def reference_statistics(scorer: FIDScorer, images: Sequence[str], feature_name: str, cache_dir: str,
                         batch_size: int = 32) -> dict:
    """Fill ``scorer``'s reference statistics from the cache, or compute and cache them; ``{"file", "reused"}``."""
    path = os.path.join(cache_dir, f"fid-reference-{reference_key(images, feature_name)}.safetensors")
    scorer.clear_reference()
    if os.path.isfile(path):
        scorer.load_reference(path)
        return {"file": path, "reused": True}
    for batch in batches(list(images), batch_size):
        scorer.add_reference(batch)
    os.makedirs(cache_dir, exist_ok=True)
    scorer.save_reference(path)
    return {"file": path, "reused": False}


@dataclass
class ImageMetrics:
    """The scorers of one run; ``fid_feature`` names ``fid``'s feature extractor in the reference cache key.
    ``fid`` (and ``fid_cache``, ``fid_feature``) None: a benchmark without FID (MMDialog)."""

    clip: ClipImageEmbedder
    fid: FIDScorer | None
    inception: InceptionScorer
    fid_cache: str | None
    fid_feature: str | None = INCEPTION_FEATURE
    batch_size: int = 32

    def set_reference(self, images: Sequence[str]) -> dict:
        """FID's reference set (cached, see :func:`reference_statistics`); ``{"file", "reused"}``."""
        if self.fid is None:
            raise ValueError("these ImageMetrics have no FID scorer (fid=None)")
        return reference_statistics(self.fid, images, self.fid_feature, self.fid_cache, self.batch_size)

    def describe(self) -> dict:
        fid = {"fid_feature": self.fid_feature} if self.fid is not None else {}
        return {"clip_model": self.clip.name, **fid,
                "inception_feature": "inception-v3-logits" if self.inception.feature is None else
                type(self.inception.feature).__name__, "inception_splits": self.inception.splits}


IMAGE_METRICS = ("clip_i", "clip_t", "inception_score", "fid")


def score_images(rows: Sequence[Row], paths: dict, examples: Sequence[ImageExample], metrics: ImageMetrics,
                 names: Sequence[str] = IMAGE_METRICS) -> list[dict]:
    """Per row: ``{"model", "setting", <name>: mean_std over seeds}`` for ``names`` (from :data:`IMAGE_METRICS`).

    CLIP-T compares each generated image with its example's last text (the caption it was generated from); FID
    needs :meth:`ImageMetrics.set_reference` first."""
    unknown = [name for name in names if name not in IMAGE_METRICS]
    if unknown:
        raise ValueError(f"unknown image metric(s) {unknown}; choose from {list(IMAGE_METRICS)}")
    if "fid" in names and metrics.fid is None:
        raise ValueError("the fid metric needs ImageMetrics(fid=FIDScorer(...))")
    target_embeds = metrics.clip.embed([ex.target for ex in examples]) if "clip_i" in names else None  # (N, d)
    text_embeds = metrics.clip.embed_text([ex.texts[-1] for ex in examples]) if "clip_t" in names else None
    results = []
    for row in rows:
        per_seed = {name: [] for name in names}
        for images in paths[row.key].values():
            generated = metrics.clip.embed(images) if target_embeds is not None or text_embeds is not None else None
            for name in names:
                if name == "clip_i":
                    value = cosine_similarities(generated, target_embeds).mean().item()
                elif name == "clip_t":
                    value = cosine_similarities(generated, text_embeds).mean().item()
                elif name == "inception_score":
                    value = metrics.inception.score(batches(images, metrics.batch_size))
                else:
                    value = metrics.fid.score(batches(images, metrics.batch_size))
                per_seed[name].append(value)
        results.append({"model": MODEL_NAMES[row.model], "setting": row.setting,
                        **{name: mean_std(values) for name, values in per_seed.items()}})
    return results
