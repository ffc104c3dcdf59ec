"""FID of images generated from a caption set against its reference images (paper appendix E.3, Table 8: 30k
MS-COCO 2014 val captions, guidance 3.0, 250 DDIM steps), for GILL and for Stable Diffusion on the same captions.

One FID per seed (all captions), reported as mean ± std over seeds; reference statistics are computed once.
"""

from collections.abc import Sequence

import torch

from .contexts import ImageExample
from .generators import EvaluatedModels
from .image_benchmark import MODEL_NAMES, Row, batches, generate_rows, sample_sections
from .image_cache import ImageStore
from .metrics import FIDScorer, mean_std
from .report import markdown_table, write_report

SETTING = "captions"


def caption_context(example: ImageExample) -> list:
    return [example.texts[0]]


def evaluate_fid(models: EvaluatedModels, examples: Sequence[ImageExample], out_dir: str, seeds: Sequence[int],
                 feature: torch.nn.Module | None = None, device: str = "cpu", baseline: bool = True,
                 batch_size: int = 32) -> dict:
    """FID per model over seeds; ``feature`` replaces torchmetrics' InceptionV3 (see :class:`FIDScorer`)."""
    if not seeds:
        raise ValueError("give at least one seed")
    rows = ([Row("sd", SETTING, caption_context)] if baseline else []) + [Row("gill", SETTING, caption_context)]
    store = ImageStore(out_dir)
    paths = generate_rows(models, rows, examples, seeds, store)
    scorer = FIDScorer(feature, device)
    for batch in batches([ex.target for ex in examples], batch_size):
        scorer.add_reference(batch)
    scored = [{"model": MODEL_NAMES[row.model], "setting": SETTING,
               "fid": mean_std([scorer.score(batches(paths[row.key][seed], batch_size)) for seed in seeds])}
              for row in rows]
    results = {"benchmark": "fid", "num_examples": len(examples), "seeds": list(seeds),
               "feature": "inception-v3-2048" if feature is None else type(feature).__name__,
               "diffusion": vars(models.settings), "rows": scored,
               "images": {"generated": store.num_generated, "reused": store.num_reused}}
    markdown = markdown_table(scored, [("fid", "FID ↓")], [SETTING], digits=2)
    write_report(out_dir, results, markdown, sample_sections(rows, paths, examples), "FID on a caption set")
    return results
