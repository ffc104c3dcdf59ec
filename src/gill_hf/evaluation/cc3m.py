"""Single-image generation on CC3M (MiniGPT-5 Table 6): an image per validation caption, GILL beside Stable
Diffusion on the same caption; CLIP-I (to the caption's image), CLIP-T (to the caption), IS and FID.

The examples come from :func:`load_caption_set` (a ``caption<TAB>image`` TSV with a header, as the GILL release's
``cc3m_val.tsv``). FID's reference statistics of the caption images are cached (see
:func:`~gill_hf.evaluation.image_quality.reference_statistics`) and reused by the next run on the same set.
"""

from collections.abc import Sequence

from .contexts import ImageExample
from .fid import caption_context
from .generators import EvaluatedModels
from .image_benchmark import Row, generate_rows, sample_sections
from .image_cache import ImageStore
from .image_quality import IMAGE_METRICS, ImageMetrics, score_images
from .report import rows_table, write_report

SETTING = "caption"
LABELS = {"clip_i": "CLIP-I ↑", "clip_t": "CLIP-T ↑", "inception_score": "IS ↑", "fid": "FID ↓"}


def evaluate_cc3m(models: EvaluatedModels, examples: Sequence[ImageExample], out_dir: str, seeds: Sequence[int],
                  metrics: ImageMetrics, baseline: bool = True) -> dict:
    """Table 6 on ``examples``; returns the ``results.json`` content."""
    if not seeds:
        raise ValueError("give at least one seed")
    rows = ([Row("sd", SETTING, caption_context)] if baseline else []) + [Row("gill", SETTING, caption_context)]
    store = ImageStore(out_dir)
    paths = generate_rows(models, rows, examples, seeds, store)
    reference = metrics.set_reference([ex.target for ex in examples])
    scored = score_images(rows, paths, examples, metrics, IMAGE_METRICS)
    results = {"benchmark": "cc3m", "num_examples": len(examples), "seeds": list(seeds), **metrics.describe(),
               "fid_reference": reference, "diffusion": vars(models.settings), "rows": scored,
               "images": {"generated": store.num_generated, "reused": store.num_reused}}
    markdown = rows_table(scored, [(key, LABELS[key]) for key in IMAGE_METRICS])
    write_report(out_dir, results, markdown, sample_sections(rows, paths, examples), "CC3M single-image generation")
    return results
