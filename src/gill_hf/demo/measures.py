"""Held-out measurements of the quickstart, each with the baseline it must beat.

Every function takes plain tensors / a model and returns numbers (Python floats), so the report and the tests can
recompute them from saved files.
"""

import torch
import torch.nn.functional as F

from ..toy_world.probe import chance_correctness, correctness
from ..training.decision_training import baseline_f1, macro_f1


@torch.no_grad()
def caption_outputs(model, processor_inputs: dict, targets: torch.Tensor):
    """Eval-mode forward on N held-out pairs without packing -> the model's ``GILLOutput`` (``text_embeds``
    ``(N, p)``, ``gen_embeds`` ``(N, L, D)``). ``processor_inputs``: input_ids, attention_mask, pixel_values."""
    was_training = model.training
    model.eval()
    out = model(**processor_inputs, gill_objective=True, gen_targets=targets, pack=False)
    model.train(was_training)
    return out


def recall_at_1(index, text_embeds: torch.Tensor) -> float:
    """Fraction of the N queries ``(N, p)`` whose top-1 candidate in ``index`` is row i (index rows = queries)."""
    _, top = index.search(text_embeds, k=1)  # (N, 1)
    return top[:, 0].eq(torch.arange(len(text_embeds))).float().mean().item()


def token_cosine(gen_embeds: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean over examples and the L positions of cos(gen_embeds, target): ``(N, L, D)`` x ``(N, L, D)``."""
    return F.cosine_similarity(gen_embeds.float(), targets.float(), dim=-1).mean().item()


def mismatched(rows: torch.Tensor) -> torch.Tensor:
    """Row i gets row i+1's value (the held-out captions are distinct, so every row gets another caption's)."""
    return torch.roll(rows, shifts=-1, dims=0)


def embedding_agreement(gen_embeds: torch.Tensor, targets: torch.Tensor, untrained: torch.Tensor) -> dict:
    """Per-token cosine to the diffusion text encoder's own embedding of the caption: the trained mapper, the same
    against a mismatched caption, and the untrained adapter's output."""
    return {"matched": token_cosine(gen_embeds, targets), "mismatched_caption": token_cosine(gen_embeds,
                                                                                             mismatched(targets)),
            "untrained_adapter": token_cosine(untrained, targets)}


@torch.no_grad()
def render(pipe, prompt_embeds: torch.Tensor, seed: int, steps: int, guidance_scale: float) -> torch.Tensor:
    """``(N, L, D)`` conditioning -> ``(N, 3, H, W)`` images in [0, 1]; every call with the same seed and N draws
    the same starting noise for row i, so rows differ only by their conditioning."""
    generator = torch.Generator().manual_seed(seed)
    images = pipe(prompt_embeds=prompt_embeds, num_inference_steps=steps, guidance_scale=guidance_scale,
                  generator=generator, output_type="pt").images  # N x (3, H, W)
    return torch.stack(images).clamp(0, 1)


def image_correctness(pipe, probe, scenes: list, gen_embeds: torch.Tensor, targets: torch.Tensor,
                      untrained: torch.Tensor, seed: int, steps: int, guidance_scale: float) -> tuple[dict, dict]:
    """The probe's reading of images drawn (same seed) from GILL's embeddings, from the diffusion text encoder's
    embedding of the true caption and from the untrained adapter's, scored against the held-out ``scenes``
    (per attribute and whole scene), beside a random guess.

    Returns (numbers by kind, (images ``(N, 3, H, W)``, readings) by kind)."""
    drawn = {"gill": gen_embeds, "caption": targets, "untrained_adapter": untrained}
    shown, numbers = {}, {}
    for kind, embeds in drawn.items():
        images = render(pipe, embeds, seed, steps, guidance_scale)
        readings = probe.predict(images)
        shown[kind] = (images, readings)
        numbers[kind] = correctness(readings, scenes)
    numbers["random"] = chance_correctness()
    return numbers, shown


def decision_scores(p_retrieve: torch.Tensor, labels: torch.Tensor, threshold: float) -> dict:
    """Held-out macro-F1 of "retrieve when P(ret) > threshold" beside the always-retrieve / always-generate /
    random baselines, with the label counts they follow from."""
    y = labels.numpy()
    pred = (p_retrieve.numpy() > threshold).astype(y.dtype)
    return {"macro_f1": macro_f1(pred, y), "baselines": baseline_f1(y), "accuracy": float((pred == y).mean()),
            "counts": {"gen": int((y == 0).sum()), "ret": int((y == 1).sum())}, "threshold": threshold}
