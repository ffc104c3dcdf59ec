"""The generate-then-compare loop shared by the VIST and VisDial evaluations (paper Tables 1, 2, Fig. 8).

Each :class:`Row` is one model on one input setting; for every seed its images are generated (or reused from the
:class:`ImageStore`, whose row folders record the settings that made them) and compared with the ground-truth
images by CLIP cosine similarity and LPIPS; a metric is averaged over examples per seed, then reported as mean ±
std over seeds.
"""

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .contexts import ImageExample
from .generators import EvaluatedModels
from .image_cache import ImageStore, safe_name
from .metrics import ClipImageEmbedder, LPIPSScorer, cosine_similarities, mean_std
from .report import sample_section

SIMILARITY_METRICS = [("clip_similarity", "CLIP Similarity ↑"), ("lpips", "LPIPS ↓")]
MODEL_NAMES = {"gill": "GILL", "sd": "Stable Diffusion"}


@dataclass
class Row:
    """``model`` ("gill" | "sd") on ``setting``; ``context(example)`` builds the input of one example."""

    model: str
    setting: str
    context: Callable[[ImageExample], list]

    @property
    def key(self) -> str:
        return safe_name(f"{self.model}-{self.setting}")

    def answer_settings(self, models: EvaluatedModels) -> dict:
        """What makes this row's images (its store folder's record)."""
        return models.answer_settings(self.model)


def row_settings(models: EvaluatedModels, rows: Sequence[Row]) -> dict[str, dict]:
    """``{row.key: what makes its images}``, for ``ImageStore.check`` / ``claim``."""
    return {row.key: row.answer_settings(models) for row in rows}


def generate_rows(models: EvaluatedModels, rows: Sequence[Row], examples: Sequence[ImageExample],
                  seeds: Sequence[int], store: ImageStore) -> dict[str, dict[int, list[str]]]:
    """``{row.key: {seed: [image path per example]}}``, generating only the images not on disk yet; every row's
    folder is claimed first (``ImageStore.claim``: other settings are a ``ValueError``, before any image)."""
    store.claim(row_settings(models, rows))
    ids = [ex.example_id for ex in examples]
    paths = {}
    for row in rows:
        make = models.gill if row.model == "gill" else models.stable_diffusion
        paths[row.key] = {seed: store.ensure(row.key, seed, ids, lambda i, s, make=make, row=row:
                                             make(row.context(examples[i]), s)) for seed in seeds}
    return paths


def batches(items: Sequence, size: int):
    """Consecutive slices of at most ``size`` items."""
    for start in range(0, len(items), size):
        yield items[start:start + size]


def score_rows(rows: Sequence[Row], paths: dict, examples: Sequence[ImageExample], clip: ClipImageEmbedder,
               lpips: LPIPSScorer, batch_size: int = 16) -> list[dict]:
    """Per row: ``{"model", "setting", "clip_similarity": mean_std, "lpips": mean_std}`` over seeds."""
    targets = [ex.target for ex in examples]
    target_embeds = clip.embed(targets)  # (N, d), computed once
    results = []
    for row in rows:
        per_seed = {"clip_similarity": [], "lpips": []}
        for images in paths[row.key].values():
            cosines = cosine_similarities(clip.embed(images), target_embeds)  # (N,)
            distances = torch.cat([lpips.scores(gen, ref) for gen, ref in
                                   zip(batches(images, batch_size), batches(targets, batch_size))])
            per_seed["clip_similarity"].append(cosines.mean().item())
            per_seed["lpips"].append(distances.mean().item())
        results.append({"model": MODEL_NAMES[row.model], "setting": row.setting,
                        **{name: mean_std(values) for name, values in per_seed.items()}})
    return results


def sample_sections(rows: Sequence[Row], paths: dict, examples: Sequence[ImageExample], num: int = 8) -> list[str]:
    """HTML sections for the first ``num`` examples: the richest input, the ground truth, each row's first seed."""
    sections = []
    for i, example in enumerate(examples[:num]):
        outputs = [(f"{MODEL_NAMES[row.model]} / {row.setting}", next(iter(paths[row.key].values()))[i])
                   for row in rows]
        sections.append(sample_section(example.example_id, rows[-1].context(example), example.target, outputs))
    return sections


def run_image_benchmark(benchmark: str, title: str, models: EvaluatedModels, rows: Sequence[Row],
                        examples: Sequence[ImageExample], seeds: Sequence[int], out_dir: str, clip: ClipImageEmbedder,
                        lpips: LPIPSScorer, settings: Sequence[str], **extra) -> dict:
    """Generate (resumably), score and write ``results.json`` / ``results.md`` / ``samples.html``."""
    from .report import markdown_table, write_report

    if not seeds:
        raise ValueError("give at least one seed")
    store = ImageStore(out_dir)
    paths = generate_rows(models, rows, examples, seeds, store)
    scored = score_rows(rows, paths, examples, clip, lpips)
    results = {"benchmark": benchmark, "num_examples": len(examples), "seeds": list(seeds),
               "settings": list(settings), "clip_model": clip.name,
               "diffusion": vars(models.settings), "rows": scored,
               "images": {"generated": store.num_generated, "reused": store.num_reused}, **extra}
    markdown = markdown_table(scored, SIMILARITY_METRICS, list(settings))
    write_report(out_dir, results, markdown, sample_sections(rows, paths, examples), title)
    return results
