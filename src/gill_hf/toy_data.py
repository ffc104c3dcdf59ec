"""Procedurally generated image-caption pairs (coloured shapes at positions), for offline demos and tests."""

import random

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}


def draw_shape(colour: str, shape: str, position: str, size: int = 64) -> Image.Image:
    """A white ``size`` x ``size`` RGB image with one filled shape."""
    image = Image.new("RGB", (size, size), (255, 255, 255))
    cx, cy = (int(v * size) for v in POSITIONS[position])
    r = size // 5
    box = (cx - r, cy - r, cx + r, cy + r)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        pen.rectangle(box, fill=COLOURS[colour])
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
    return image


def shape_corpus(n: int, seed: int = 0, size: int = 64) -> list[tuple[Image.Image, str]]:
    """``n`` (image, caption) pairs such as (<red circle on the left>, "a red circle on the left")."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        colour, shape, position = rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(POSITIONS))
        preposition = "on the" if position in ("left", "right") else "at the"
        pairs.append((draw_shape(colour, shape, position, size), f"a {colour} {shape} {preposition} {position}"))
    return pairs
