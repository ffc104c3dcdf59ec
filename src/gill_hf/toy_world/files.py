"""Toy training files on disk (CC3M TSV, VIST SIS JSON) from the toy world's shapes; nothing is downloaded."""

import json
import os

from PIL import Image

from .scenes import COLOURS, SHAPES, draw_shape


def shape_image(colour: str, shape: str, size: int = 40) -> Image.Image:
    """A ``size`` x ``size`` white image with one ``colour`` ``shape`` (left of centre)."""
    return draw_shape(colour, shape, "left", size)


def toy_pairs(n: int) -> list[tuple[str, Image.Image]]:
    """``n`` (caption, image) pairs cycling through every colour x shape; captions have equal token counts."""
    combos = [(c, s) for s in SHAPES for c in COLOURS]
    return [(f"a {c} {s}", shape_image(c, s)) for c, s in (combos[i % len(combos)] for i in range(n))]


def write_toy_cc3m(out_dir: str | os.PathLike, n: int, corrupt: int = 0) -> str:
    """Write ``n`` pairs as a CC3M-style ``caption<TAB>image`` TSV + PNGs (the last ``corrupt`` images are garbage
    bytes); returns the TSV path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    lines = ["caption\timage"]
    for i, (caption, image) in enumerate(toy_pairs(n)):
        name = f"images/{i:05d}.png"
        if i >= n - corrupt:
            with open(os.path.join(out_dir, name), "wb") as f:
                f.write(b"not an image")
        else:
            image.save(os.path.join(out_dir, name))
        lines.append(f"{caption}\t{name}")
    path = os.path.join(out_dir, "train.tsv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_toy_vist(out_dir: str | os.PathLike, num_stories: int, steps: int = 3) -> str:
    """Write a VIST SIS-format JSON of toy stories (one shape per step) + images; returns the JSON path."""
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    pairs = toy_pairs(num_stories * steps)
    annotations = []
    for s in range(num_stories):
        for j in range(steps):
            caption, image = pairs[s * steps + j]
            photo = f"{s * steps + j + 1000}"
            image.save(os.path.join(out_dir, f"{photo}.png"))
            annotations.append([{"story_id": str(s), "photo_flickr_id": photo, "text": f"then we saw {caption}",
                                 "worker_arranged_photo_order": j}])
    path = os.path.join(out_dir, "sis_train.json")
    with open(path, "w") as f:
        json.dump({"annotations": annotations}, f)
    return path
