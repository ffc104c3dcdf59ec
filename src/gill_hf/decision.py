"""Retrieve-vs-generate decision (paper Sec. 3.3 and appendix): a linear classifier on the [IMG0] hidden state.

The head is ``nn.Sequential(Dropout, Linear(f [+1], 2))`` (``model.adapter.decision_head``), label 0 = generate,
1 = retrieve. The appendix variant appends the maximum retrieval cosine similarity over the candidate set as one
more input feature (``GILLConfig.decision_use_retrieval_score``). The released head
(``decision_model.pth.tar``, keys ``1.weight`` (2, 4096) and ``1.bias``) loads on CPU with ``weights_only``.
"""

import os
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

LABELS = ("gen", "ret")  # class index -> decision
RELEASED_KEYS = ("1.weight", "1.bias")


@dataclass
class Decision:
    """What to do for one image: ``mode`` "gen" or "ret", from ``p_retrieve`` = P(ret) against ``threshold``."""

    mode: Literal["gen", "ret"]
    p_retrieve: float
    threshold: float
    forced: bool = False  # True when the caller chose the mode instead of the classifier


def load_decision_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The released (or our own) decision checkpoint -> ``{"1.weight": (2, F), "1.bias": (2,)}`` on CPU.

    Accepts ``{"state_dict": {...}}`` or a flat dict, with or without a ``module.`` prefix; never unpickles code.
    """
    data = torch.load(path, map_location="cpu", weights_only=True)
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict):
        raise ValueError(f"{os.fspath(path)} does not hold a decision-model state dict")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if set(state) != set(RELEASED_KEYS):
        raise ValueError(f"{os.fspath(path)} has keys {sorted(state)}, expected {list(RELEASED_KEYS)} "
                         f"(nn.Sequential(Dropout, Linear(F, 2)))")
    weight, bias = state["1.weight"], state["1.bias"]
    if weight.dim() != 2 or weight.shape[0] != 2 or tuple(bias.shape) != (2,):
        raise ValueError(f"decision weights must be (2, F) and (2,), got {tuple(weight.shape)} and {tuple(bias.shape)}")
    return state


def head_from_file(path: str | os.PathLike, dropout: float = 0.5) -> nn.Sequential:
    """A standalone head with the checkpoint's width (e.g. the released 4096-wide one), in eval mode."""
    state = load_decision_state_dict(path)
    head = nn.Sequential(nn.Dropout(dropout), nn.Linear(state["1.weight"].shape[1], 2))
    head.load_state_dict(state)
    return head.eval()


def load_decision_head(model, path: str | os.PathLike):
    """Copy a decision checkpoint into ``model.adapter.decision_head``; a width mismatch names both widths."""
    state = load_decision_state_dict(path)
    linear = model.adapter.decision_head[1]
    if state["1.weight"].shape != linear.weight.shape:
        raise ValueError(f"{os.fspath(path)} holds a decision head on {state['1.weight'].shape[1]} features but this "
                         f"model's takes {linear.weight.shape[1]} (feature width + decision_use_retrieval_score)")
    model.adapter.decision_head.load_state_dict({k: v.to(linear.weight) for k, v in state.items()})


def decision_features(img0_states: torch.Tensor, max_similarity: torch.Tensor | None,
                      use_retrieval_score: bool) -> torch.Tensor:
    """``(N, f)`` [IMG0] states (+ ``(N,)`` max retrieval cosine for the appendix variant) -> ``(N, f [+1])``."""
    if not use_retrieval_score:
        return img0_states
    if max_similarity is None:
        raise ValueError("this decision head also takes the maximum retrieval similarity: pass max_similarity "
                         "(needs a retrieval index)")
    return torch.cat([img0_states, max_similarity.reshape(-1, 1).to(img0_states)], dim=-1)


@torch.no_grad()
def retrieve_probabilities(head: nn.Sequential, features: torch.Tensor) -> torch.Tensor:
    """``(N, F)`` features -> ``(N,)`` P(retrieve); dropout is skipped whatever the module's mode."""
    linear = head[1]
    if features.shape[-1] != linear.in_features:
        raise ValueError(f"the decision head takes {linear.in_features} features, got {features.shape[-1]}")
    logits = linear(features.to(linear.weight)).float()  # (N, 2)
    return logits.softmax(-1)[:, 1]


def decide(model, img0_states: torch.Tensor, max_similarity: torch.Tensor | None = None,
           threshold: float | None = None) -> list[Decision]:
    """One :class:`Decision` per image from the model's head: retrieve when P(ret) > threshold
    (default ``config.decision_threshold``; the original's argmax is 0.5)."""
    threshold = model.config.decision_threshold if threshold is None else threshold
    features = decision_features(img0_states, max_similarity, model.config.decision_use_retrieval_score)
    probs = retrieve_probabilities(model.adapter.decision_head, features)
    return [Decision(LABELS[int(p > threshold)], float(p), threshold) for p in probs.tolist()]
