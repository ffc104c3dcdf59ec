"""GILLProcessor: interleaved text/images -> token ids with visual placeholders + CLIP pixel values.

Each image becomes ``num_visual_tokens`` copies of the ``<|image|>`` placeholder (the model overwrites them with
W_cap(CLIP(image))). The BOS token opens the first text segment, as the original encodes prompts; an input with
no text ends with BOS. Text is tokenized with ``split_special_tokens=True``, so a user who types ``[IMG0]`` or
``<|image|>`` gets ordinary text tokens, never the special ids.
"""

import os
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from transformers import BatchFeature, ProcessorMixin

IMAGE_TOKEN = "<|image|>"


def img_token_strings(num_img_tokens: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(num_img_tokens)]


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: alpha is composited on white, 16/32-bit and float images are rescaled to 8 bit."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        values = np.asarray(image, dtype=np.float64)
        if values.max(initial=0) > 255:  # 16-bit range
            values = values / 257.0
        return Image.fromarray(np.clip(values, 0, 255).round().astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "P" or (image.mode in ("L", "RGB") and "transparency" in image.info):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source) -> Image.Image:
    """Open an image file (path) or pass a PIL image through; a file that cannot be decoded raises ``ValueError``."""
    if isinstance(source, Image.Image):
        return source
    try:
        with Image.open(source) as image:
            image.load()
            return image.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ValueError(f"could not decode image {os.fspath(source)!r}: {err}") from err


def _flatten_chat(content) -> list:
    """Chat-style content (``{"type": "text"|"image", ...}`` or messages with ``content``) -> str / image items."""
    items = []
    for part in content:
        if isinstance(part, dict) and "content" in part:
            inner = part["content"]
            items.extend(_flatten_chat([inner] if isinstance(inner, str) else inner))
        elif isinstance(part, dict):
            kind = part.get("type")
            if kind == "text":
                items.append(part["text"])
            elif kind == "image":
                source = part.get("image", part.get("path"))
                if source is None:
                    raise ValueError(f"image part {part} has neither 'image' nor 'path'")
                items.append(load_image(source))
            else:
                raise ValueError(f"unknown content part type {kind!r}; expected 'text' or 'image'")
        elif isinstance(part, (str, Image.Image)):
            items.append(part)
        elif isinstance(part, os.PathLike):
            items.append(load_image(part))
        else:
            raise TypeError(f"interleaved inputs hold str, PIL.Image, os.PathLike or dict parts, got "
                            f"{type(part).__name__}")
    return items


def _is_single_sample(inputs) -> bool:
    if isinstance(inputs, (str, Image.Image, dict, os.PathLike)):
        return True
    return len(inputs) == 0 or not isinstance(inputs[0], (list, tuple))


class GILLProcessor(ProcessorMixin):
    """Tokenizer (with ``<|image|>`` and ``[IMG0..r-1]`` added) + CLIP image processor.

    Args:
        image_processor: a CLIP image processor (the vision backbone's own).
        tokenizer: the LLM's tokenizer; the special tokens are added when missing.
        num_visual_tokens: k, placeholders per input image.
        num_img_tokens: r, the ``[IMG]`` tokens appended to captions and produced by the model.
    """

    def __init__(self, image_processor=None, tokenizer=None, num_visual_tokens: int = 4, num_img_tokens: int = 8,
                 chat_template=None, **kwargs):
        self.num_visual_tokens = num_visual_tokens
        self.num_img_tokens = num_img_tokens
        missing = [t for t in [IMAGE_TOKEN, *img_token_strings(num_img_tokens)]
                   if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As ``ProcessorMixin.from_pretrained``, with the PIL image backend by default: it resizes as the original
        (transformers' torchvision backend differs by up to 0.015 in pixel values)."""
        kwargs.setdefault("backend", "pil")
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ---- token ids ----
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def img_token_ids(self) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(img_token_strings(self.num_img_tokens))

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    # ---- public API ----
    def __call__(self, inputs=None, images=None, text=None, padding_side: str = "right", return_tensors="pt",
                 **kwargs) -> BatchFeature:
        """Encode one interleaved sample or a batch of them.

        ``inputs`` is a list of ``str`` / ``PIL.Image`` / ``os.PathLike`` / chat parts (one sample) or a list of
        such lists (a batch). ``text=`` and ``images=`` are accepted for pipelines that pass them separately: the
        images come first, then the text, per sample.

        Returns ``input_ids`` and ``attention_mask`` ``(B, T)`` padded on ``padding_side`` and, when there are
        images, ``pixel_values`` ``(N_images, 3, H, W)`` in reading order across the batch.
        """
        if inputs is None:
            inputs = self._from_text_and_images(text, images)
        samples = [inputs] if _is_single_sample(inputs) else list(inputs)
        if not samples:
            raise ValueError("GILLProcessor got an empty batch")
        sequences, all_images = [], []
        for sample in samples:
            items = _flatten_chat([sample] if isinstance(sample, (str, Image.Image, dict, os.PathLike)) else sample)
            ids, images_here = self._encode_items(items)
            sequences.append(ids)
            all_images.extend(images_here)
        data = self._pad(sequences, padding_side)
        if all_images:
            data["pixel_values"] = self.preprocess_images(all_images)
        return BatchFeature(data, tensor_type=return_tensors)

    def _from_text_and_images(self, text, images):
        if text is None and images is None:
            raise ValueError("GILLProcessor needs `inputs`, or `text` and/or `images`")
        texts = [text] if isinstance(text, str) else list(text or [])
        image_lists = [] if images is None else ([images] if isinstance(images, Image.Image) else list(images))
        if texts and image_lists and len(image_lists) != len(texts):
            image_lists = [image_lists]  # one sample with several images
        n = max(len(texts), len(image_lists))
        batch = []
        for i in range(n):
            imgs = image_lists[i] if i < len(image_lists) else []
            imgs = [imgs] if isinstance(imgs, Image.Image) else list(imgs)
            batch.append(imgs + ([texts[i]] if i < len(texts) else []))
        return batch

    def _encode_items(self, items: Sequence) -> tuple[list[int], list[Image.Image]]:
        ids, images, bos_placed = [], [], False
        bos = self.tokenizer.bos_token_id
        for item in items:
            if isinstance(item, str):
                if not bos_placed and bos is not None:
                    ids.append(bos)
                bos_placed = True
                ids.extend(self._text_ids(item))
            else:
                images.append(to_rgb(item))
                ids.extend([self.image_token_id] * self.num_visual_tokens)
        if not bos_placed and bos is not None:
            ids.append(bos)
        return ids, images

    def preprocess_images(self, images: Sequence) -> torch.Tensor:
        """Images (any PIL mode, or paths) -> CLIP ``pixel_values`` ``(N, 3, H, W)`` float32."""
        rgb = [to_rgb(load_image(image)) for image in images]
        return self.image_processor(rgb, return_tensors="pt")["pixel_values"]

    def encode_captions(self, captions: Sequence[str], max_length: int = 32) -> BatchFeature:
        """Training captions -> ``"<bos> caption [IMG0]..[IMG{r-1}]"`` right-padded to the longest, (B, T <= max_length).

        Captions that are too long are cut so the r [IMG] tokens always fit.
        """
        budget = max_length - self.num_img_tokens - 1
        if budget < 1:
            raise ValueError(f"max_length={max_length} leaves no room for a caption next to "
                             f"{self.num_img_tokens} [IMG] tokens and BOS")
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        tokenized = self.tokenizer(list(captions), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        sequences = [bos + ids[:budget] + self.img_token_ids for ids in tokenized]
        return BatchFeature(self._pad(sequences, "right"), tensor_type="pt")

    def _pad(self, sequences: list[list[int]], padding_side: str) -> dict:
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(len(s) for s in sequences)
        pad = self.tokenizer.pad_token_id
        input_ids = np.full((len(sequences), width), pad, dtype=np.int64)
        attention_mask = np.zeros((len(sequences), width), dtype=np.int64)
        for row, seq in enumerate(sequences):
            cols = slice(width - len(seq), width) if padding_side == "left" else slice(0, len(seq))
            input_ids[row, cols] = seq
            attention_mask[row, cols] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload the processor files in one commit (no transformers model card); see gill_hf.hub.push_to_hub."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)
