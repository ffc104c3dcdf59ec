"""MiniGPT-5's VIST evaluations (its Tables 1-3), each story cut into its 5 steps.

* ``final-step`` (Table 1): the last image from four prompt types: ``no context`` (its text), ``text context`` (the
  five texts), ``image context`` (the four earlier images, then the last text), ``image-text context`` (texts and
  images interleaved, then the last text); CLIP-I, IS, FID.
* ``all-steps`` (Table 2): the image of every step from the image-text history before it and its text; CLIP-I, FID.
* ``narration`` (Table 3): the text of every step from ``"Story:"``, the history and the step's image (greedy, no
  image);
  SBERT, ROUGE-L, METEOR. Stable Diffusion generates no text, so this table has no baseline.

The image tables run Stable Diffusion on the step's ground-truth caption beside GILL. Differences from MiniGPT-5's
``metric.py``: no VIST CLIP-T (it was computed against the ``[IMG0]...[IMG7]`` placeholder string, not a caption),
and FID is one statistic over all generated images of a row against all ground-truth images (the original's
per-story "task FID" over <= 5 images is not a meaningful estimate and is not reported).
"""

from collections.abc import Sequence

from .contexts import ImageExample, context_image
from .generators import EvaluatedModels
from .image_benchmark import Row, generate_rows, sample_sections
from .image_cache import ImageStore, TextStore
from .image_quality import ImageMetrics, score_images
from .metrics import mean_std
from .report import rows_table, write_report
from .text_metrics import TextScorers

PROMPT_TYPES = {"none": "no context", "text": "text context", "image": "image context",
                "image-text": "image-text context"}  # CLI key -> MiniGPT-5's name
TABLES = ("final-step", "all-steps", "narration")
BASELINE = "ground-truth caption"
NARRATION_PREFIX = "Story:"
NARRATION_METRICS = [("sbert", "SBERT ↑"), ("rouge_l", "ROUGE-L ↑"), ("meteor", "METEOR ↑")]
IMAGE_METRICS = {"final-step": [("clip_i", "CLIP-I ↑"), ("inception_score", "IS ↑"), ("fid", "FID ↓")],
                 "all-steps": [("clip_i", "CLIP-I ↑"), ("fid", "FID ↓")]}
TITLES = {"final-step": "VIST final-step image generation (MiniGPT-5 Table 1)",
          "all-steps": "VIST all-steps image generation (MiniGPT-5 Table 2)",
          "narration": "VIST all-steps narration generation (MiniGPT-5 Table 3)"}


def story_steps(example: ImageExample) -> list[ImageExample]:
    """A story from :func:`load_vist` as one example per step: step j's image is the target, its texts are those
    of steps 1..j and its context images those of steps 1..j-1."""
    images = [*example.context_images, example.target]
    return [ImageExample(f"{example.example_id}-step{j + 1}", images[j], example.texts[:j + 1], images[:j])
            for j in range(len(images))]


def _history(step: ImageExample) -> list:
    """The earlier steps as text, image, text, image ... (context images at 224 px)."""
    items = []
    for text, path in zip(step.texts[:-1], step.context_images):
        items += [text, context_image(path)]
    return items


def step_context(step: ImageExample, prompt_type: str) -> list:
    """The input of one step under a MiniGPT-5 prompt type (see the module docstring)."""
    if prompt_type == "no context" or prompt_type == BASELINE:
        return [step.texts[-1]]
    if prompt_type == "text context":
        return [" ".join(step.texts)]
    if prompt_type == "image context":
        return [context_image(path) for path in step.context_images] + [step.texts[-1]]
    if prompt_type == "image-text context":
        return _history(step) + [step.texts[-1]]
    raise ValueError(f"unknown VIST prompt type {prompt_type!r}; choose from {list(PROMPT_TYPES.values())}")


def narration_context(step: ImageExample) -> list:
    """``NARRATION_PREFIX``, the history, then the step's own image: GILL continues with its narration (the prefix
    gives the first step, which has no history, the text part every GILL input needs)."""
    return [NARRATION_PREFIX, *_history(step), context_image(step.target)]


def _row(model: str, setting: str) -> Row:
    return Row(model, setting, lambda step, setting=setting: step_context(step, setting))


def image_rows(table: str, prompt_types: Sequence[str], baseline: bool) -> list[Row]:
    gill = prompt_types if table == "final-step" else ["image-text context"]
    return ([_row("sd", BASELINE)] if baseline else []) + [_row("gill", p) for p in gill]


def _image_table(table: str, models, steps, seeds, store, metrics, prompt_types, baseline) -> tuple[dict, list]:
    rows = image_rows(table, prompt_types, baseline)
    paths = generate_rows(models, rows, steps, seeds, store)
    reference = metrics.set_reference([step.target for step in steps])
    scored = score_images(rows, paths, steps, metrics, [key for key, _ in IMAGE_METRICS[table]])
    return ({"num_examples": len(steps), "fid_reference": reference, "rows": scored},
            sample_sections(rows, paths, steps, num=4))


def _narration_table(models: EvaluatedModels, steps, out_dir, scorers: TextScorers, max_new_tokens: int) -> dict:
    store = TextStore(out_dir)
    paths = store.ensure("gill-narration", "greedy", [step.example_id for step in steps],
                         lambda i, _: models.gill_text(narration_context(steps[i]), max_new_tokens))
    predictions = [TextStore.read(path) for path in paths]
    scores = scorers.score(predictions, [step.texts[-1] for step in steps], [key for key, _ in NARRATION_METRICS])
    row = {"model": "GILL", "setting": "image-text history + image",
           **{name: mean_std([sum(values) / len(values)]) for name, values in scores.items()}}
    return {"num_examples": len(steps), "rows": [row], "texts": {"generated": store.num_generated,
                                                                 "reused": store.num_reused}}


def evaluate_minigpt5_vist(models: EvaluatedModels, examples: Sequence[ImageExample], out_dir: str,
                           seeds: Sequence[int], metrics: ImageMetrics | None, text_scorers: TextScorers | None,
                           prompt_types: Sequence[str] = tuple(PROMPT_TYPES.values()), tables: Sequence[str] = TABLES,
                           baseline: bool = True, max_new_tokens: int = 32) -> dict:
    """Run the chosen ``tables`` on stories from :func:`load_vist`; returns the ``results.json`` content.

    ``metrics`` is needed for the image tables, ``text_scorers`` (with SBERT) for ``narration``."""
    bad = [t for t in tables if t not in TABLES] or [p for p in prompt_types if p not in PROMPT_TYPES.values()]
    if bad:
        raise ValueError(f"unknown table / prompt type {bad}; tables: {list(TABLES)}, prompt types: "
                         f"{list(PROMPT_TYPES.values())}")
    image_tables = [t for t in tables if t != "narration"]
    if (image_tables and metrics is None) or ("narration" in tables and text_scorers is None):
        raise ValueError("the image tables need metrics=ImageMetrics(...), narration needs text_scorers=")
    if image_tables and not seeds:
        raise ValueError("give at least one seed")
    stories = [story_steps(example) for example in examples]
    steps, finals = [step for story in stories for step in story], [story[-1] for story in stories]
    store, results, markdown, sections = ImageStore(out_dir), {}, "", []
    for table in tables:
        if table == "narration":
            results[table] = _narration_table(models, steps, out_dir, text_scorers, max_new_tokens)
            metric_columns = NARRATION_METRICS
        else:
            results[table], table_sections = _image_table(table, models, finals if table == "final-step" else steps,
                                                          seeds, store, metrics, prompt_types, baseline)
            sections += table_sections
            metric_columns = IMAGE_METRICS[table]
        markdown += f"## {TITLES[table]}\n\n" + rows_table(results[table]["rows"], metric_columns) + "\n"
    results = {"benchmark": "minigpt5-vist", "num_stories": len(examples), "seeds": list(seeds),
               "tables": results, "diffusion": vars(models.settings),
               **(metrics.describe() if metrics is not None else {}),
               **({"sbert_model": text_scorers.sbert.name} if "narration" in tables else {}),
               "images": {"generated": store.num_generated, "reused": store.num_reused}}
    write_report(out_dir, results, markdown, sections, "MiniGPT-5 VIST benchmarks")
    return results
