"""Fitting the retrieve-vs-generate head on the PartiPrompts annotations (paper Sec. 3.3, appendix C, Table 6).

Annotation files (``/work/shared/data/gill-release/``): ``PartiPromptsAllDecisions_*.tsv`` hold five votes per
prompt (``Decisions`` = "ret,gen,gen,same,gen"); ``PartiPromptsDecisionsConfident.tsv`` holds the confident label
(``Decision``): "gen"/"ret" when at least 3 of 5 votes chose it and at most 1 the other, else "same"; "same"
prompts are dropped. As the original, the first 600 labelled prompts train, the rest
validate (201 gen / 110 ret). Features: the [IMG0] state of ``"<bos> prompt [IMG0..r-1]"``.
"""

import csv
import os
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..decision import LABELS, decision_features, retrieve_probabilities

LABEL_IDS = {name: i for i, name in enumerate(LABELS)}  # gen 0, ret 1


def confident_label(votes: list[str]) -> str:
    """Five annotator votes -> "gen" or "ret" when at least 3 chose it and at most 1 the other, else "same"
    (reproduces ``PartiPromptsDecisionsConfident.tsv`` from the alignment votes)."""
    counts = Counter(v.strip() for v in votes)
    for label, other in (("gen", "ret"), ("ret", "gen")):
        if counts[label] >= 3 and counts[other] <= 1:
            return label
    return "same"


def read_partiprompts(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(prompt, "gen" | "ret") pairs in file order; "same" and unconfident prompts are left out."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if "Prompt" not in (reader.fieldnames or []):
            raise ValueError(f"{path}: expected a 'Prompt' column, got {reader.fieldnames}")
        rows = list(reader)
    pairs = []
    for row in rows:
        if "Decision" in row:
            label = row["Decision"].strip()
        elif "Decisions" in row:
            label = confident_label(row["Decisions"].split(","))
        else:
            raise ValueError(f"{path}: needs a 'Decision' or 'Decisions' column")
        if label in LABEL_IDS:
            pairs.append((row["Prompt"], label))
    return pairs


@torch.no_grad()
def prompt_states(model, prompts: list[str], batch_size: int = 32, max_length: int = 64) -> torch.Tensor:
    """``(N, f)`` float32 [IMG0] states of ``"<bos> prompt [IMG0..r-1]"`` on CPU."""
    states = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="decision features", leave=False):
        enc = model.processor.encode_captions(prompts[start:start + batch_size], max_length=max_length)
        ids = enc["input_ids"].to(model.device)
        _, features, _ = model.run_language_model(model.embed_tokens(ids), enc["attention_mask"].to(model.device),
                                                  use_cache=False)
        rows, cols = model.img_block_positions(ids)
        states.append(features[rows[:, 0], cols[:, 0]].float().cpu())  # (b, f)
    return torch.cat(states)


def prompt_features(model, prompts: list[str], batch_size: int = 32, max_length: int = 64,
                    max_similarity: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, F)`` decision-head inputs: the [IMG0] state after each prompt (+ max retrieval cosine if the head
    takes it)."""
    states = prompt_states(model, prompts, batch_size, max_length)
    return decision_features(states, max_similarity, model.config.decision_use_retrieval_score)


def train_decision_head(head: torch.nn.Sequential, features: torch.Tensor, labels: torch.Tensor, steps: int = 2000,
                        lr: float = 1e-3, seed: int = 0) -> list[float]:
    """Full-batch AdamW (no weight decay) with cross-entropy, as the original; returns the loss per step. The head
    trains in fp32 (master weights, no autocast) and returns to its dtype."""
    torch.manual_seed(seed)
    dtype = head[1].weight.dtype
    head.float().train().requires_grad_(True)  # fp32 master weights whatever the model's dtype / autocast
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    x, y = features.to(head[1].weight), labels.to(head[1].weight.device)
    losses = []
    # fp32 even inside an autocast region: autocast caches the low-precision copy of each trainable weight for the
    # whole region, so a loop inside one would keep using the first step's weights (the loss then diverges)
    with torch.autocast(x.device.type, enabled=False):
        for _ in range(steps):
            loss = F.cross_entropy(head(x).float(), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    head.to(dtype).eval().requires_grad_(False)
    return losses


def macro_f1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the two classes of F1 (a class never predicted nor present scores 0)."""
    scores = []
    for c in (0, 1):
        tp = np.sum((pred == c) & (labels == c))
        denom = np.sum(pred == c) + np.sum(labels == c)
        scores.append(2 * tp / denom if denom else 0.0)
    return float(np.mean(scores))


def baseline_f1(labels: np.ndarray, num_draws: int = 1000, seed: int = 0) -> dict[str, float]:
    """Table 6's baselines: always retrieve, always generate, random with the class prior (mean of draws)."""
    rng = np.random.default_rng(seed)
    prior = labels.mean()
    draws = rng.random((num_draws, len(labels))) < prior
    return {"always_retrieve": macro_f1(np.ones_like(labels), labels),
            "always_generate": macro_f1(np.zeros_like(labels), labels),
            "random": float(np.mean([macro_f1(d.astype(labels.dtype), labels) for d in draws]))}


def threshold_sweep(p_retrieve: np.ndarray, labels: np.ndarray, thresholds=None) -> dict[float, float]:
    """Macro-F1 of "retrieve when P(ret) > t" for each threshold t (default 0.05 .. 0.95)."""
    thresholds = np.round(np.linspace(0.05, 0.95, 19), 2) if thresholds is None else thresholds
    return {float(t): macro_f1((p_retrieve > t).astype(labels.dtype), labels) for t in thresholds}


def fit_decision_model(model, annotations: str | os.PathLike, num_train: int = 600, steps: int = 2000,
                       lr: float = 1e-3, batch_size: int = 32) -> dict:
    """Fit ``model.adapter.decision_head`` on the first ``num_train`` labelled prompts; report on the rest.

    Returns ``{"num_train", "num_val", "val_counts", "f1_at_0.5", "sweep", "best_threshold", "baselines",
    "losses"}``; sets ``config.decision_threshold`` to the best threshold of the sweep.
    """
    pairs = read_partiprompts(annotations)
    if len(pairs) <= num_train:
        raise ValueError(f"{annotations}: {len(pairs)} labelled prompts, not more than num_train={num_train}")
    prompts = [p for p, _ in pairs]
    labels = torch.tensor([LABEL_IDS[lab] for _, lab in pairs])
    features = prompt_features(model, prompts, batch_size=batch_size)
    losses = train_decision_head(model.adapter.decision_head, features[:num_train], labels[:num_train], steps, lr)
    p_val = retrieve_probabilities(model.adapter.decision_head, features[num_train:]).cpu().numpy()
    y_val = labels[num_train:].numpy()
    sweep = threshold_sweep(p_val, y_val)
    best = max(sweep, key=sweep.get)
    model.config.decision_threshold = best
    return {"num_train": num_train, "num_val": len(y_val),
            "val_counts": {name: int((y_val == i).sum()) for name, i in LABEL_IDS.items()},
            "f1_at_0.5": macro_f1((p_val > 0.5).astype(y_val.dtype), y_val), "sweep": sweep,
            "best_threshold": best, "baselines": baseline_f1(y_val), "losses": losses}
