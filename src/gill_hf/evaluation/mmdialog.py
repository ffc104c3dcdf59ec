"""Multi-turn multimodal response generation on MMDialog (MiniGPT-5 Table 5).

Dialogues come from :func:`~gill_hf.training.mmdialog.read_mmdialog` (its filtering). Every turn i > 0 is a
response to predict from MiniGPT-5's history window (``history_window(i)``: the previous exchange, plus the current
human turn for an assistant response); GILL answers freely (greedy text, at most one generated image). The window
is written per ``prompt_format``: "minigpt5" (the default) as MiniGPT-5's stage-2 dialogue data
(``chat_templates.minigpt5_dialogue_prompt``, the answer ending at its ``###``), what a model trained by this
library's stage-2 recipe or converted from MiniGPT-5 saw; "plain" as texts and images interleaved (for GILL
checkpoints). Answers are stored per format, never reused across formats, nor across models or generation
settings (the store folder records them). Per dialogue: BLEU-1, BLEU-2, ROUGE-L and SBERT averaged over its
responses, and MM-Relevance (:mod:`.mm_relevance`, CLIP-F1 over its responses' text and image entries); each is
then averaged over dialogues. IS is computed over all generated images (null when fewer than its splits were
generated). Every metric is one value per seed, reported as mean ± std.
"""

import html
from collections.abc import Sequence

import numpy as np

from ..chat_templates import MINIGPT5_STOP, minigpt5_dialogue_prompt, placeholder_parts
from ..html_report import part_html
from ..training.data import check_prompt_format
from ..training.mmdialog import Dialogue, history_window
from .contexts import context_image
from .generators import EvaluatedModels
from .image_benchmark import batches
from .image_cache import ResponseStore, safe_name
from .image_quality import ImageMetrics
from .metrics import cosine_similarities, mean_std
from .minigpt5_vist import stored_row
from .mm_relevance import clip_f1, modality_entry
from .report import figure, rows_table, thumbnail, write_report
from .text_metrics import TextScorers

TEXT_METRICS = ("bleu_1", "bleu_2", "rouge_l", "sbert")
LABELS = [("inception_score", "IS ↑"), ("bleu_1", "BLEU-1 ↑"), ("bleu_2", "BLEU-2 ↑"), ("rouge_l", "ROUGE-L ↑"),
          ("sbert", "SBERT ↑"), ("mm_relevance", "MM-Relevance ↑")]


def response_context(dialogue: Dialogue, turn: int) -> list:
    """The window before ``turn`` as interleaved text / image (224 px) parts."""
    parts = []
    for previous in (dialogue.turns[i] for i in history_window(turn)):
        parts.append(previous.text)
        if previous.image is not None:
            parts.append(context_image(previous.image))
    return parts


def minigpt5_response_prompt(dialogue: Dialogue, turn: int) -> list:
    """The window before ``turn`` as MiniGPT-5's stage-2 dialogue prompt (``minigpt5_dialogue_prompt``: its system
    prompt, one ``###Human: {text} <Img><|image|></Img>`` line per turn, then the tag of ``turn``'s role), as parts
    with the window's images (224 px) in placeholder order."""
    window = [dialogue.turns[i] for i in history_window(turn)]
    text = minigpt5_dialogue_prompt([(t.role, t.text, t.image is not None) for t in window], dialogue.turns[turn].role)
    return placeholder_parts(text, [context_image(t.image) for t in window if t.image is not None])


# prompt format -> (the prompt of a turn, the stop string ending the answer)
PROMPTS = {"minigpt5": (minigpt5_response_prompt, MINIGPT5_STOP), "plain": (response_context, None)}


def response_examples(dialogues: Sequence[Dialogue]) -> list[tuple[int, int, str]]:
    """``(dialogue index, turn, example id)`` of every response to predict."""
    return [(d, turn, safe_name(f"{dialogue.conversation_id}-turn{turn}"))
            for d, dialogue in enumerate(dialogues) for turn in range(1, len(dialogue.turns))]


def _dialogue_scores(dialogues, responses, predictions, metrics: ImageMetrics, text_scorers: TextScorers
                     ) -> dict[str, float]:
    """Every metric but IS for one seed: per dialogue, then the mean over dialogues."""
    references = [dialogues[d].turns[turn] for d, turn, _ in responses]
    texts = text_scorers.score([text for text, _ in predictions], [ref.text for ref in references], TEXT_METRICS)
    both_text = [i for i, (text, _) in enumerate(predictions) if text]
    text_cos = dict(zip(both_text, cosine_similarities(
        metrics.clip.embed_text([predictions[i][0] for i in both_text]),
        metrics.clip.embed_text([references[i].text for i in both_text])).tolist())) if both_text else {}
    both_image = [i for i, ((_, image), ref) in enumerate(zip(predictions, references)) if image and ref.image]
    image_cos = dict(zip(both_image, cosine_similarities(
        metrics.clip.embed([predictions[i][1] for i in both_image]),
        metrics.clip.embed([references[i].image for i in both_image])).tolist())) if both_image else {}
    per_dialogue = {name: [] for name in (*TEXT_METRICS, "mm_relevance")}
    for d in range(len(dialogues)):
        members = [i for i, (owner, _, _) in enumerate(responses) if owner == d]
        if not members:
            continue
        for name in TEXT_METRICS:
            per_dialogue[name].append(float(np.mean([texts[name][i] for i in members])))
        entries = []
        for i in members:
            entries.append(modality_entry(True, bool(predictions[i][0]), text_cos.get(i)))
            entries.append(modality_entry(references[i].image is not None, predictions[i][1] is not None,
                                          image_cos.get(i)))
        per_dialogue["mm_relevance"].append(clip_f1(entries))
    return {name: float(np.mean(values)) for name, values in per_dialogue.items()}


def evaluate_mmdialog(models: EvaluatedModels, dialogues: Sequence[Dialogue], out_dir: str, seeds: Sequence[int],
                      metrics: ImageMetrics, text_scorers: TextScorers, max_new_tokens: int = 32,
                      prompt_format: str = "minigpt5") -> dict:
    """Table 5 on ``dialogues`` (from :func:`read_mmdialog`); returns the ``results.json`` content.

    ``prompt_format``: "minigpt5" prompts each turn as MiniGPT-5's stage-2 dialogue data does
    (:func:`minigpt5_response_prompt`) and ends answers at its ``###``; "plain" feeds :func:`response_context`."""
    check_prompt_format(prompt_format)
    prompt, stop = PROMPTS[prompt_format]
    if not seeds:
        raise ValueError("give at least one seed")
    responses = response_examples(dialogues)
    if not responses:
        raise ValueError("no dialogue has a response to predict (every kept dialogue has a single turn)")
    store, row = ResponseStore(out_dir), stored_row("gill", prompt_format)
    ids = [example_id for _, _, example_id in responses]
    store.claim({row: models.answer_settings("gill", max_new_tokens=max_new_tokens, stop=stop,
                                             prompt_format=prompt_format)})
    per_seed, inception, predictions = {}, [], {}
    for seed in seeds:
        paths = store.ensure(row, seed, ids, lambda i, s: models.gill_response(
            prompt(dialogues[responses[i][0]], responses[i][1]), s, max_new_tokens, stop=stop))
        predictions[seed] = [ResponseStore.read(path) for path in paths]
        for name, value in _dialogue_scores(dialogues, responses, predictions[seed], metrics, text_scorers).items():
            per_seed.setdefault(name, []).append(value)
        images = [image for _, image in predictions[seed] if image is not None]
        inception.append(metrics.inception.score(batches(images, metrics.batch_size))
                         if len(images) >= metrics.inception.splits else None)
    row = {"model": "GILL", "setting": "dialogue history",
           "inception_score": mean_std(inception) if None not in inception else None,
           **{name: mean_std(values) for name, values in per_seed.items()}}
    results = {"benchmark": "mmdialog", "prompt_format": prompt_format, "num_dialogues": len(dialogues),
               "num_responses": len(responses), "seeds": list(seeds), **metrics.describe(),
               "sbert_model": text_scorers.sbert.name,
               "diffusion": vars(models.settings), "rows": [row],
               "generated_images": {seed: sum(image is not None for _, image in predictions[seed]) for seed in seeds},
               "responses": {"generated": store.num_generated, "reused": store.num_reused}}
    sections = [_sample(dialogues[d], turn, prompt(dialogues[d], turn), predictions[seeds[0]][i])
                for i, (d, turn, _) in enumerate(responses[:8])]
    write_report(out_dir, results, rows_table([row], LABELS), sections, "MMDialog multimodal response generation")
    return results


def _sample(dialogue: Dialogue, turn: int, context: list, prediction: tuple[str, str | None]) -> str:
    """One response in samples.html: the prompt GILL got, the ground truth and GILL's answer (text, image)."""
    reference, (text, image) = dialogue.turns[turn], prediction
    prompt = "".join(part_html(thumbnail(p) if not isinstance(p, str) else p) for p in context)
    answer = f"<p><b>ground truth:</b> {html.escape(reference.text)}</p><p><b>GILL:</b> {html.escape(text)}</p>"
    images = (figure(reference.image, "ground truth") if reference.image else "") + (
        figure(image, "GILL") if image else "")
    return (f"<h3>{html.escape(dialogue.conversation_id)}, turn {turn}</h3><div class='turn'>{prompt}</div>"
            f"<div>{answer}{images}</div>")
