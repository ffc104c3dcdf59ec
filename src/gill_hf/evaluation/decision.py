"""Retrieve-vs-generate decision on the PartiPrompts annotations (paper appendix C, Table 6): macro-F1 on the
validation split (labelled prompts after the first ``num_train``) of the model's decision head over a threshold
sweep, the heuristic "retrieve when the best retrieval cosine exceeds t" (needs a retrieval index), and the
always-retrieve / always-generate / random baselines."""

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from ..decision import decision_features, retrieve_probabilities
from ..training.decision_training import (
    LABEL_IDS,
    baseline_f1,
    macro_f1,
    prompt_states,
    read_partiprompts,
    threshold_sweep,
)
from .report import write_report

HEURISTIC_THRESHOLDS = np.round(np.linspace(0.0, 1.0, 21), 2)


def validation_split(path: str | os.PathLike, num_train: int = 600, limit: int | None = None
                     ) -> tuple[list[str], np.ndarray]:
    """Prompts and labels (0 gen, 1 ret) after the first ``num_train`` labelled prompts (the first ``limit``)."""
    pairs = read_partiprompts(path)[num_train:]
    pairs = pairs[:limit] if limit else pairs
    if not pairs:
        raise ValueError(f"{os.fspath(path)}: no labelled prompts after the first {num_train}")
    return [p for p, _ in pairs], np.array([LABEL_IDS[label] for _, label in pairs])


def max_cosines(model, states: torch.Tensor, index) -> torch.Tensor:
    """``(N,)`` best cosine of each prompt's retrieval embedding over the index's candidates."""
    with torch.no_grad():
        queries = model.text_retrieval_embeddings(states.to(model.adapter.w_t2i.weight))
    scores, _ = index.search(queries.float().cpu(), k=1)
    return scores[:, 0] / math.exp(index.logit_scale)


def _sweep_summary(sweep: dict[float, float], at: float, f1_at: float) -> dict:
    return {"sweep": sweep, "min": min(sweep.values()), "max": max(sweep.values()),
            "best_threshold": max(sweep, key=sweep.get), "threshold": at, "f1_at_threshold": f1_at}


def evaluate_annotations(model, path: str | os.PathLike, num_train: int = 600, limit: int | None = None,
                         index=None, batch_size: int = 32) -> dict:
    """Table 6 on one annotation file; ``model=None`` gives the baselines only."""
    prompts, labels = validation_split(path, num_train, limit)
    result = {"file": os.path.basename(os.fspath(path)), "num_val": len(labels),
              "val_counts": {name: int((labels == i).sum()) for name, i in LABEL_IDS.items()},
              "baselines": baseline_f1(labels)}
    if model is None:
        return result
    states = prompt_states(model, prompts, batch_size)
    cosines = max_cosines(model, states, index) if index is not None else None
    if cosines is not None:
        heuristic = threshold_sweep(cosines.numpy(), labels, HEURISTIC_THRESHOLDS)
        result["heuristic"] = _sweep_summary(heuristic, 0.5, heuristic[0.5])
    features = decision_features(states, cosines, model.config.decision_use_retrieval_score)
    p_retrieve = retrieve_probabilities(model.adapter.decision_head, features).cpu().numpy()
    threshold = float(model.config.decision_threshold)
    result["classifier"] = _sweep_summary(threshold_sweep(p_retrieve, labels), threshold,
                                          macro_f1((p_retrieve > threshold).astype(labels.dtype), labels))
    return result


def _table(result: dict) -> str:
    b = result["baselines"]
    lines = ["| Method | F1 |", "|---|---|", f"| Always retrieve | {b['always_retrieve']:.3f} |",
             f"| Always generate | {b['always_generate']:.3f} |", f"| Random | {b['random']:.3f} |"]
    for key, name in (("heuristic", "Heuristic"), ("classifier", "Linear classifier")):
        if key in result:
            r = result[key]
            lines.append(f"| {name} | {r['min']:.3f} – {r['max']:.3f} ({r['f1_at_threshold']:.3f} at "
                         f"{r['threshold']:g}) |")
    return "\n".join(lines) + "\n"


def evaluate_decision(model, annotation_files: Sequence[str | os.PathLike], out_dir: str, num_train: int = 600,
                      limit: int | None = None, index=None, batch_size: int = 32) -> dict:
    """Table 6 for each annotation file; writes the report and returns the ``results.json`` content."""
    files = [evaluate_annotations(model, path, num_train, limit, index, batch_size) for path in annotation_files]
    markdown = "\n".join(f"## {r['file']} ({r['num_val']} validation prompts: {r['val_counts']['gen']} gen, "
                         f"{r['val_counts']['ret']} ret)\n\n{_table(r)}" for r in files)
    results = {"benchmark": "decision", "num_train": num_train, "files": files}
    write_report(out_dir, results, markdown, [], "Retrieve-vs-generate decision (PartiPrompts)")
    return results
