"""Procedurally generated image-caption pairs (coloured shapes at positions), for offline demos and tests.

Besides random pairs (:func:`shape_corpus`) there are the scenes themselves (:func:`all_scenes`, 6 colours x 3
shapes x 4 positions = 72), short "stories" over a set of scenes (:func:`shape_stories`) and descriptions of things
the corpus never draws (:func:`novel_prompts`: other shapes, colours, places, or two objects at once).
"""

import itertools
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
           "purple": (150, 60, 190), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
POSITIONS = {"left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72)}
NOVEL_COLOURS = ("pink", "black", "white", "gray")  # words the tiny tokenizer knows but the corpus never draws
NOVEL_SHAPES = ("star", "ring", "cross")
NOVEL_PLACES = ("in the middle", "in the corner", "at the center", "next to the tree")
OTHER_KINDS = ("photo", "picture", "drawing", "painting")  # pictures of things outside the shapes world
OTHER_SUBJECTS = ("my dog", "my cat", "a man", "a woman", "a child", "people", "a tree", "a flower", "the sun",
                  "the moon", "a car", "a bus", "a train", "a house")
OTHER_PLACES = ("on the beach", "in the park", "on the street", "in the city", "in the water", "next to the house",
                "in the sky")


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
        pairs.append((draw_shape(colour, shape, position, size), scene_caption((colour, shape, position))))
    return pairs


def place_phrase(position: str) -> str:
    """"left" -> "on the left", "top" -> "at the top"."""
    return f"{'on the' if position in ('left', 'right') else 'at the'} {position}"


def scene_caption(scene: tuple[str, str, str]) -> str:
    """``(colour, shape, position)`` -> "a red circle on the left"."""
    colour, shape, position = scene
    return f"a {colour} {shape} {place_phrase(position)}"


def all_scenes() -> list[tuple[str, str, str]]:
    """Every ``(colour, shape, position)`` the corpus can draw, in a fixed order (72 of them)."""
    return list(itertools.product(COLOURS, SHAPES, POSITIONS))


def shape_stories(scenes: list[tuple[str, str, str]], num_stories: int, length: int = 3, seed: int = 0,
                  size: int = 64) -> list[list[tuple[str, Image.Image, tuple[str, str, str]]]]:
    """``num_stories`` stories of ``length`` distinct scenes drawn from ``scenes``; each step is
    ``(text, image, scene)`` with text "a red circle on the left" first, then "then a blue square at the top"."""
    if length > len(scenes):
        raise ValueError(f"a story of {length} distinct steps needs at least {length} scenes, got {len(scenes)}")
    rng = random.Random(seed)
    stories = []
    for _ in range(num_stories):
        steps = rng.sample(scenes, length)
        stories.append([(("then " if i else "") + scene_caption(scene), draw_shape(*scene, size=size), scene)
                        for i, scene in enumerate(steps)])
    return stories


def novel_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct descriptions the corpus cannot hold: half are pictures of other things ("a photo of my dog
    on the beach"), the rest shapes with at least one unseen colour, shape or place, or two corpus objects in one
    picture ("a red circle and a blue square")."""
    rng = random.Random(seed)
    colours, places = list(COLOURS) + list(NOVEL_COLOURS), [place_phrase(p) for p in POSITIONS] + list(NOVEL_PLACES)
    shapes = list(SHAPES) + list(NOVEL_SHAPES)
    prompts: dict[str, None] = {}
    for _ in range(1000 * n):
        if len(prompts) == n:
            break
        kind = rng.random()
        if kind < 0.5:
            prompts[f"a {rng.choice(OTHER_KINDS)} of {rng.choice(OTHER_SUBJECTS)} {rng.choice(OTHER_PLACES)}"] = None
            continue
        if kind < 0.65:
            (c1, s1), (c2, s2) = [(rng.choice(list(COLOURS)), rng.choice(SHAPES)) for _ in range(2)]
            prompts[f"a {c1} {s1} and a {c2} {s2}"] = None
            continue
        colour, shape, place = rng.choice(colours), rng.choice(shapes), rng.choice(places)
        if colour in NOVEL_COLOURS or shape in NOVEL_SHAPES or place in NOVEL_PLACES:
            prompts[f"a {colour} {shape} {place}"] = None
    if len(prompts) < n:
        raise ValueError(f"asked for {n} distinct novel prompts, could only make {len(prompts)}")
    return list(prompts)


def as_story_steps(texts: list[str], prob: float, rng: random.Random) -> list[str]:
    """Write each text as a story step ("then a red circle on the left") with probability ``prob``."""
    return [("then " + text) if rng.random() < prob else text for text in texts]


@dataclass
class ToySplit:
    """Scenes held out from training (distinct), training captions with their scenes, and stories over the
    held-out scenes (``[[(text, image, scene), ...], ...]``)."""

    heldout_scenes: list
    train_scenes: list
    train_captions: list
    stories: list

    @property
    def heldout_captions(self) -> list[str]:
        return [scene_caption(scene) for scene in self.heldout_scenes]


def split_scenes(eval_size: int, train_size: int, then_prob: float, num_stories: int, story_length: int,
                 seed: int = 0, size: int = 64) -> ToySplit:
    """Hold out ``eval_size`` of the 72 scenes; ``train_size`` training scenes drawn from the rest (``then_prob``
    of their captions written as story steps); ``num_stories`` stories of ``story_length`` held-out scenes."""
    rng = random.Random(seed)
    scenes = all_scenes()
    rng.shuffle(scenes)
    heldout, seen = scenes[:eval_size], scenes[eval_size:]
    train = [rng.choice(seen) for _ in range(train_size)]
    captions = as_story_steps([scene_caption(s) for s in train], then_prob, rng)
    return ToySplit(heldout, train, captions, shape_stories(heldout, num_stories, story_length, seed, size))
