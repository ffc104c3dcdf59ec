"""The generation and retrieval losses of Eq. 3 and Eq. 4."""

import torch
import torch.nn.functional as F


def generation_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2") -> torch.Tensor:
    """l_g between mapper outputs and diffusion text-encoder targets, both ``(N, L, D)``.

    ``"l2"``: mean over (N, L) of the per-token Euclidean distance, what the released GILL code trains with.
    ``"mse"``: mean squared error over every element (the paper's Eq. 3 up to a constant).
    """
    if pred.shape != target.shape:
        raise ValueError(f"generation targets have shape {tuple(target.shape)}, the mapper produces "
                         f"{tuple(pred.shape)}")
    diff = pred.float() - target.float()
    if kind == "l2":
        return diff.pow(2).sum(-1).sqrt().mean()
    return diff.pow(2).mean()


def contrastive_loss(text_emb: torch.Tensor, image_emb: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (Eq. 4) over ``(N, p)`` text and image embeddings, temperature ``exp(-logit_scale)``.

    Row i of each side is the positive of row i of the other. Under data parallelism the caller passes globally
    gathered embeddings.
    """
    text = F.normalize(text_emb.float(), dim=-1)
    image = F.normalize(image_emb.float(), dim=-1)
    logits_per_image = logit_scale.float().exp() * image @ text.t()  # (N, N)
    labels = torch.arange(text.shape[0], device=text.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_image.t(), labels)) / 2
