"""The toy world: coloured shapes at places, their captions and stories (``scenes``), training files on disk
(``files``), backbones that know it (``backbones``: a tiny LLM and a tiny Stable Diffusion pretrained on it, shipped
as fp16 safetensors under ``weights/``) and an independent probe that judges images (``probe``).

Data generation, the training examples, the quickstart and the web demo all read the world from here.
"""

from .files import shape_image, toy_pairs, write_toy_cc3m, write_toy_vist
from .scenes import (COLOURS, NOVEL_COLOURS, NOVEL_PLACES, NOVEL_SHAPES, POSITIONS, SHAPES, ToySplit, all_scenes,
                     as_story_steps, draw_shape, novel_prompts, place_phrase, scene_caption, shape_corpus,
                     shape_stories, split_scenes)

__all__ = ["COLOURS", "NOVEL_COLOURS", "NOVEL_PLACES", "NOVEL_SHAPES", "POSITIONS", "SHAPES", "ToySplit", "all_scenes",
           "as_story_steps", "draw_shape", "novel_prompts", "place_phrase", "scene_caption", "shape_corpus",
           "shape_image", "shape_stories", "split_scenes", "toy_pairs", "write_toy_cc3m", "write_toy_vist"]
