"""MM-Relevance: Divter's CLIP-F1 between a dialogue's predicted and ground-truth responses (MMDialog, MiniGPT-5
Table 5).

Each response turn contributes one entry per modality (text, image) that the ground truth or the prediction has:

* both have it: the CLIP cosine (text-text through CLIP's text tower, image-image through its image tower);
* the ground truth has it, the prediction lacks it: ``MISSING`` (-1), which counts toward recall's denominator only;
* the prediction has it, the ground truth lacks it: ``EXTRA`` (-2), which counts toward precision's only.

Per dialogue, precision = (sum of the cosines) / (number of predicted modalities), recall = the same sum / (number of
ground-truth modalities), MM-Relevance = 2PR / (P + R) (0 when P + R <= 0); the benchmark averages it over dialogues.
"""

from collections.abc import Sequence

MISSING, EXTRA = -1, -2


def modality_entry(has_reference: bool, has_prediction: bool, cosine: float | None = None) -> tuple | None:
    """One modality of one turn: ``("match", cosine)``, ``("marker", MISSING | EXTRA)`` or None (neither has it)."""
    if has_reference and has_prediction:
        if cosine is None:
            raise ValueError("a modality both responses have needs its CLIP cosine")
        return ("match", float(cosine))
    if has_reference:
        return ("marker", MISSING)
    if has_prediction:
        return ("marker", EXTRA)
    return None


def clip_f1(entries: Sequence[tuple]) -> float:
    """Divter's CLIP-F1 over one dialogue's entries (from :func:`modality_entry`; None entries are skipped)."""
    entries = [e for e in entries if e is not None]
    total = sum(value for kind, value in entries if kind == "match")
    num_predicted = sum(1 for kind, value in entries if kind == "match" or value == EXTRA)
    num_reference = sum(1 for kind, value in entries if kind == "match" or value == MISSING)
    precision = total / num_predicted if num_predicted else 0.0
    recall = total / num_reference if num_reference else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
