"""Contextual image generation on VIST (paper Table 1): the last image of each story from 1 caption, 5 captions,
or 5 captions + 4 images, GILL against Stable Diffusion on the text settings."""

from collections.abc import Sequence
from functools import partial

from .contexts import VIST_SETTINGS, ImageExample, vist_context
from .generators import EvaluatedModels
from .image_benchmark import Row, run_image_benchmark
from .metrics import ClipImageEmbedder, LPIPSScorer

TEXT_ONLY = ("1 caption", "5 captions")  # the settings Stable Diffusion can take


def vist_rows(settings: Sequence[str] = VIST_SETTINGS, baseline: bool = True) -> list[Row]:
    """Stable Diffusion rows (text settings) first, then GILL's, in the paper's order."""
    unknown = [s for s in settings if s not in VIST_SETTINGS]
    if unknown:
        raise ValueError(f"unknown VIST setting(s) {unknown}; choose from {list(VIST_SETTINGS)}")
    sd = [Row("sd", s, partial(vist_context, setting=s)) for s in settings if s in TEXT_ONLY] if baseline else []
    return sd + [Row("gill", s, partial(vist_context, setting=s)) for s in settings]


def evaluate_vist(models: EvaluatedModels, examples: Sequence[ImageExample], out_dir: str, seeds: Sequence[int],
                  clip: ClipImageEmbedder, lpips: LPIPSScorer, settings: Sequence[str] = VIST_SETTINGS,
                  baseline: bool = True) -> dict:
    """Run Table 1 on ``examples`` (from :func:`load_vist`); returns the ``results.json`` content."""
    return run_image_benchmark("vist", "VIST contextual image generation", models, vist_rows(settings, baseline),
                               examples, seeds, out_dir, clip, lpips, settings)
