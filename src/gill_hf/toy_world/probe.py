"""An independent judge of toy-world images: a small CNN that reads colour, shape and position off a picture.

It is trained on rendered scenes only (``draw_shape``, with noise, shifts and blur as augmentation), never on
diffusion outputs, so it can score generated images without sharing their model's mistakes.
"""

import random

import torch
import torch.nn.functional as F
from torch import nn

from .scenes import COLOURS, POSITIONS, SHAPES, all_scenes, draw_shape

PROBE_SIZE = 32  # px of the images the probe reads (others are resized)
ATTRIBUTES = {"colour": list(COLOURS), "shape": list(SHAPES), "position": list(POSITIONS)}


class ToyProbe(nn.Module):
    """``(N, 3, 32, 32)`` images in [0, 1] -> ``{"colour": (N, 6), "shape": (N, 3), "position": (N, 4)}`` logits."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            nn.Linear(2 * width * 16, 64), nn.ReLU())
        self.heads = nn.ModuleDict({name: nn.Linear(64, len(values)) for name, values in ATTRIBUTES.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-2:] != (PROBE_SIZE, PROBE_SIZE):
            images = F.interpolate(images, size=(PROBE_SIZE, PROBE_SIZE), mode="bilinear", antialias=True)
        hidden = self.features(images * 2 - 1)
        return {name: head(hidden) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[tuple[str, str, str]]:
        """``(N, 3, H, W)`` images in [0, 1] -> N ``(colour, shape, position)`` readings."""
        logits = self.eval()(images.float())
        picks = {name: logits[name].argmax(-1).tolist() for name in ATTRIBUTES}
        return [tuple(ATTRIBUTES[name][picks[name][i]] for name in ATTRIBUTES) for i in range(len(images))]


def scene_tensor(scenes: list[tuple[str, str, str]], size: int = PROBE_SIZE) -> torch.Tensor:
    """Rendered scenes as ``(N, 3, size, size)`` floats in [0, 1]."""
    import numpy as np

    pixels = np.stack([np.asarray(draw_shape(*scene, size=size)) for scene in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255


def scene_labels(scenes: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
    """Class indices of each attribute, ``{name: (N,)}``."""
    return {name: torch.tensor([values.index(scene[i]) for scene in scenes])
            for i, (name, values) in enumerate(ATTRIBUTES.items())}


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Shifts of up to 2 px, a random blur, brightness / contrast changes and Gaussian noise, in [0, 1]."""
    n = len(images)
    shift = torch.randint(-2, 3, (2,), generator=generator).tolist()
    out = torch.roll(images, shifts=shift, dims=(2, 3))
    if torch.rand((), generator=generator) < 0.5:
        out = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    scale = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    offset = 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    noise = torch.randn(out.shape, generator=generator) * 0.15 * torch.rand(n, 1, 1, 1, generator=generator)
    return (out * scale + offset + noise).clamp(0, 1)


def train_probe(steps: int = 400, batch_size: int = 64, lr: float = 3e-3, seed: int = 0) -> ToyProbe:
    """Fit a :class:`ToyProbe` on augmented renderings of every scene (cross-entropy summed over attributes)."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    scenes = all_scenes()
    images, labels = scene_tensor(scenes), scene_labels(scenes)
    probe = ToyProbe()
    optimizer = torch.optim.AdamW(probe.parameters(), lr=lr)
    rng = random.Random(seed)
    for _ in range(steps):
        rows = torch.tensor([rng.randrange(len(scenes)) for _ in range(batch_size)])
        logits = probe(augment(images[rows], generator))
        loss = sum(F.cross_entropy(logits[name], labels[name][rows]) for name in ATTRIBUTES)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return probe.eval()


def correctness(readings: list[tuple[str, str, str]], scenes: list[tuple[str, str, str]]) -> dict[str, float]:
    """Share of images whose reading matches the scene: per attribute and all three at once ("scene")."""
    n = len(scenes)
    out = {name: sum(r[i] == s[i] for r, s in zip(readings, scenes)) / n for i, name in enumerate(ATTRIBUTES)}
    out["scene"] = sum(tuple(r) == tuple(s) for r, s in zip(readings, scenes)) / n
    return out


def chance_correctness() -> dict[str, float]:
    """What a uniformly random guess scores on :func:`correctness`."""
    out = {name: 1 / len(values) for name, values in ATTRIBUTES.items()}
    out["scene"] = 1 / len(all_scenes())
    return out
