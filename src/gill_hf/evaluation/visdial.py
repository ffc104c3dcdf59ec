"""Contextual image generation on VisDial (paper Table 2: 1, 5, 10 rounds; appendix Fig. 8: every number of rounds
1..10, ``curve=True``, also plotted to ``context_curve.png``)."""

import os
from collections.abc import Sequence
from functools import partial

from ..atomic import atomic_path
from .contexts import (
    MAX_VISDIAL_ROUNDS,
    VISDIAL_ROUNDS,
    ImageExample,
    rounds_setting,
    visdial_context,
)
from .generators import EvaluatedModels
from .image_benchmark import SIMILARITY_METRICS, Row, run_image_benchmark
from .metrics import ClipImageEmbedder, LPIPSScorer

CURVE_FILE = "context_curve.png"


def visdial_rows(rounds: Sequence[int], baseline: bool = True) -> list[Row]:
    models = ("sd", "gill") if baseline else ("gill",)
    return [Row(m, rounds_setting(n), partial(visdial_context, rounds=n)) for m in models for n in rounds]


def plot_curve(results: dict, path: str):
    """CLIP similarity and LPIPS (mean ± std over seeds) against the number of rounds, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rounds = results["rounds"]
    fig, axes = plt.subplots(1, len(SIMILARITY_METRICS), figsize=(10, 4))
    for ax, (key, label) in zip(axes, SIMILARITY_METRICS):
        for model in dict.fromkeys(row["model"] for row in results["rows"]):
            stats = {row["setting"]: row[key] for row in results["rows"] if row["model"] == model}
            points = [stats[rounds_setting(n)] for n in rounds]
            ax.errorbar(rounds, [p["mean"] for p in points], yerr=[p["std"] for p in points], marker="o",
                        capsize=3, label=model)
        ax.set_xlabel("rounds of dialogue")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    try:
        with atomic_path(path, ".png") as tmp:
            fig.savefig(tmp, format="png", dpi=100)
    finally:
        plt.close(fig)


def evaluate_visdial(models: EvaluatedModels, examples: Sequence[ImageExample], out_dir: str, seeds: Sequence[int],
                     clip: ClipImageEmbedder, lpips: LPIPSScorer, rounds: Sequence[int] = VISDIAL_ROUNDS,
                     curve: bool = False, baseline: bool = True) -> dict:
    """Run Table 2 (or with ``curve`` the Fig. 8 sweep) on ``examples`` (from :func:`load_visdial`)."""
    rounds = list(range(1, MAX_VISDIAL_ROUNDS + 1)) if curve else list(rounds)
    bad = [n for n in rounds if not 1 <= n <= MAX_VISDIAL_ROUNDS]
    if bad:
        raise ValueError(f"rounds must be in 1..{MAX_VISDIAL_ROUNDS}, got {bad}")
    results = run_image_benchmark("visdial", "VisDial contextual image generation", models,
                                  visdial_rows(rounds, baseline), examples, seeds, out_dir, clip, lpips,
                                  [rounds_setting(n) for n in rounds], rounds=rounds)
    if curve:
        plot_curve(results, os.path.join(out_dir, CURVE_FILE))
    return results

