"""MiniGPT-5's VIST evaluations (its Tables 1-3), each story cut into its 5 steps.

* ``final-step`` (Table 1): the last image from four prompt types: ``no context`` (its text), ``text context`` (the
  five texts), ``image context`` (the four earlier images, then the last text), ``image-text context`` (texts and
  images interleaved, then the last text); CLIP-I, IS, FID.
* ``all-steps`` (Table 2): the image of every step from the image-text history before it and its text; CLIP-I, FID.
* ``narration`` (Table 3): the text of every step from ``"Story:"``, the history and the step's image (greedy, no
  image);
  SBERT, ROUGE-L, METEOR. Stable Diffusion generates no text, so this table has no baseline.

GILL's inputs follow ``prompt_format``: "minigpt5" (the default) writes each step as MiniGPT-5's stage-2 VIST data
does (``chat_templates.minigpt5_story_prompt``: its system prompt, ``###Human:``, the history's captions each
followed by ``<Img><|image|></Img>``, the "gen" task's instruction with the step's text, ``###Assistant:``; for the
narrations its image-to-text task with the step's image, generation ending at its ``###``), as a model trained by
this library's stage-2 recipe or converted from MiniGPT-5's checkpoints saw in training; "plain" feeds the parts
above (for GILL checkpoints). Answers are stored per format, never reused across formats, and each store folder
records the settings that made its answers (another model, ``max_new_tokens``, diffusion options ... are refused).

The image tables run Stable Diffusion on the step's ground-truth caption beside GILL. Differences from MiniGPT-5's
``metric.py``: no VIST CLIP-T (it was computed against the ``[IMG0]...[IMG7]`` placeholder string, not a caption),
and FID is one statistic over all generated images of a row against all ground-truth images (the original's
per-story "task FID" over <= 5 images is not a meaningful estimate and is not reported).
"""

from collections.abc import Sequence
from dataclasses import dataclass

from ..chat_templates import MINIGPT5_STOP, minigpt5_story_prompt, placeholder_parts
from ..training.data import TASK_INSTRUCTIONS, check_prompt_format
from .contexts import ImageExample, context_image
from .generators import EvaluatedModels
from .image_benchmark import Row, generate_rows, row_settings, sample_sections
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


def minigpt5_step_prompt(step: ImageExample, prompt_type: str) -> list:
    """One step's input as MiniGPT-5's stage-2 "gen" task prompt (``minigpt5_story_prompt``), as parts: the
    history's captions and images per prompt type (``image context``: images without captions), then
    ``Generate an image with the scene description: {text}`` with the step's text (``text context``: the five
    texts as that description; ``no context``: no history)."""
    instruction = TASK_INSTRUCTIONS["gen"]
    if prompt_type == "text context":
        return placeholder_parts(minigpt5_story_prompt([], instruction.format(text=" ".join(step.texts))), [])
    history = {"no context": [], "image context": [""] * len(step.context_images),
               "image-text context": step.texts[:-1]}.get(prompt_type)
    if history is None:
        raise ValueError(f"unknown VIST prompt type {prompt_type!r}; choose from {list(PROMPT_TYPES.values())}")
    images = [context_image(path) for path in step.context_images[:len(history)]]
    return placeholder_parts(minigpt5_story_prompt(history, instruction.format(text=step.texts[-1])), images)


def minigpt5_narration_prompt(step: ImageExample) -> list:
    """One step's narration input as MiniGPT-5's stage-2 image-to-text task prompt, as parts: the history's
    captions and images, ``Tell me the next scene description by this image:`` and the step's own image."""
    text = minigpt5_story_prompt(step.texts[:-1], TASK_INSTRUCTIONS["text"], instruction_image=True)
    return placeholder_parts(text, [context_image(path) for path in [*step.context_images, step.target]])


def stored_row(row: str, prompt_format: str) -> str:
    """The store name of a GILL row: plain rows keep their name, others carry the format, so answers to one
    prompt format are never reused for another."""
    return row if prompt_format == "plain" else f"{row}-{prompt_format}"


@dataclass
class PromptedRow(Row):
    """A GILL row under ``prompt_format``, stored apart from the other format's (see :func:`stored_row`)."""

    prompt_format: str

    @property
    def key(self) -> str:
        return stored_row(super().key, self.prompt_format)

    def answer_settings(self, models: EvaluatedModels) -> dict:
        return models.answer_settings(self.model, prompt_format=self.prompt_format)


def _gill_row(prompt_type: str, prompt_format: str) -> PromptedRow:
    build = minigpt5_step_prompt if prompt_format == "minigpt5" else step_context
    return PromptedRow("gill", prompt_type, lambda step: build(step, prompt_type), prompt_format)


def image_rows(table: str, prompt_types: Sequence[str], baseline: bool, prompt_format: str) -> list[Row]:
    """The rows of an image table: the Stable Diffusion baseline (on the caption, whatever the format), then
    GILL's under ``prompt_format``."""
    gill = prompt_types if table == "final-step" else ["image-text context"]
    sd = [Row("sd", BASELINE, lambda step: step_context(step, BASELINE))] if baseline else []
    return sd + [_gill_row(p, prompt_format) for p in gill]


def _image_table(table: str, models, steps, seeds, store, metrics, prompt_types, baseline, prompt_format
                 ) -> tuple[dict, list]:
    rows = image_rows(table, prompt_types, baseline, prompt_format)
    paths = generate_rows(models, rows, steps, seeds, store)
    reference = metrics.set_reference([step.target for step in steps])
    scored = score_images(rows, paths, steps, metrics, [key for key, _ in IMAGE_METRICS[table]])
    return ({"num_examples": len(steps), "fid_reference": reference, "rows": scored},
            sample_sections(rows, paths, steps, num=4))


def _narration_prompt(prompt_format: str) -> tuple:
    """(the narration input of a step, the stop string) under ``prompt_format``."""
    return (minigpt5_narration_prompt, MINIGPT5_STOP) if prompt_format == "minigpt5" else (narration_context, None)


def _narration_settings(models: EvaluatedModels, max_new_tokens: int, prompt_format: str) -> dict[str, dict]:
    """``{row: settings}`` of the narrations' store folder (for ``TextStore.check`` / ``claim``)."""
    return {stored_row("gill-narration", prompt_format): models.answer_settings(
        "gill_text", max_new_tokens=max_new_tokens, stop=_narration_prompt(prompt_format)[1],
        prompt_format=prompt_format)}


def _narration_table(models: EvaluatedModels, steps, store: TextStore, scorers: TextScorers, max_new_tokens: int,
                     prompt_format: str) -> dict:
    prompt, stop = _narration_prompt(prompt_format)
    settings = _narration_settings(models, max_new_tokens, prompt_format)
    store.claim(settings)
    paths = store.ensure(next(iter(settings)), "greedy", [step.example_id for step in steps],
                         lambda i, _: models.gill_text(prompt(steps[i]), max_new_tokens, stop=stop))
    predictions = [TextStore.read(path) for path in paths]
    scores = scorers.score(predictions, [step.texts[-1] for step in steps], [key for key, _ in NARRATION_METRICS])
    row = {"model": "GILL", "setting": "image-text history + image",
           **{name: mean_std([sum(values) / len(values)]) for name, values in scores.items()}}
    return {"num_examples": len(steps), "rows": [row], "texts": {"generated": store.num_generated,
                                                                 "reused": store.num_reused}}


def evaluate_minigpt5_vist(models: EvaluatedModels, examples: Sequence[ImageExample], out_dir: str,
                           seeds: Sequence[int], metrics: ImageMetrics | None, text_scorers: TextScorers | None,
                           prompt_types: Sequence[str] = tuple(PROMPT_TYPES.values()), tables: Sequence[str] = TABLES,
                           baseline: bool = True, max_new_tokens: int = 32, prompt_format: str = "minigpt5") -> dict:
    """Run the chosen ``tables`` on stories from :func:`load_vist`; returns the ``results.json`` content.

    ``metrics`` is needed for the image tables, ``text_scorers`` (with SBERT) for ``narration``.
    ``prompt_format``: "minigpt5" prompts GILL as MiniGPT-5's stage-2 VIST data does (:func:`minigpt5_step_prompt`,
    :func:`minigpt5_narration_prompt`; narrations end at its ``###``), "plain" with the interleaved parts
    (:func:`step_context`, :func:`narration_context`)."""
    check_prompt_format(prompt_format)
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
    store, text_store, results, markdown, sections = ImageStore(out_dir), TextStore(out_dir), {}, "", []
    # every store folder is checked before anything is written or generated
    store.check(row_settings(models, [row for table in image_tables
                                      for row in image_rows(table, prompt_types, baseline, prompt_format)]))
    if "narration" in tables:
        text_store.check(_narration_settings(models, max_new_tokens, prompt_format))
    for table in tables:
        if table == "narration":
            results[table] = _narration_table(models, steps, text_store, text_scorers, max_new_tokens,
                                              prompt_format)
            metric_columns = NARRATION_METRICS
        else:
            results[table], table_sections = _image_table(table, models, finals if table == "final-step" else steps,
                                                          seeds, store, metrics, prompt_types, baseline,
                                                          prompt_format)
            sections += table_sections
            metric_columns = IMAGE_METRICS[table]
        markdown += f"## {TITLES[table]}\n\n" + rows_table(results[table]["rows"], metric_columns) + "\n"
    results = {"benchmark": "minigpt5-vist", "prompt_format": prompt_format, "num_stories": len(examples),
               "seeds": list(seeds), "tables": results, "diffusion": vars(models.settings),
               **(metrics.describe() if metrics is not None else {}),
               **({"sbert_model": text_scorers.sbert.name} if "narration" in tables else {}),
               "images": {"generated": store.num_generated, "reused": store.num_reused}}
    write_report(out_dir, results, markdown, sections, "MiniGPT-5 VIST benchmarks")
    return results
