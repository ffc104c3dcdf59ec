"""GILLProcessor: interleaved text/images -> token ids with visual placeholders + CLIP pixel values.

Each image becomes ``num_visual_tokens`` copies of the ``<|image|>`` placeholder (the model overwrites them with
W_cap(CLIP(image))). The BOS token opens the first text segment, as the original encodes prompts; an input with
no text ends with BOS. Two ways in:

* transformers convention, ``processor(text=..., images=...)`` (and ``apply_chat_template``): each ``<|image|>``
  in the text marks where the next image goes (the counts must match); the text is tokenized as by the tokenizer
  itself, so chat markup and other special-token strings become their ids.
* list of parts, ``processor([image, "text", ...])`` (or a batch of such lists): ``str`` parts are plain user
  text, tokenized with ``split_special_tokens=True`` (a typed ``[IMG0]`` or ``<|image|>`` stays text); a sample
  made of chat messages (``{"role", "content"}`` dicts) is rendered with the default chat template first (no
  generation prompt).

Images may be PIL images, paths, ``os.PathLike``, http(s) URLs, base64 / data URIs, bytes, numpy arrays, torch
tensors or ``{"type": "image", "url" | "path" | "image" | "base64": ...}`` parts (see ``gill_hf.image_io``).
"""

import warnings

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature, ProcessorMixin

from .chat_templates import BUILTIN_CHAT_TEMPLATES, GILL_CHAT_TEMPLATE, IMAGE_TOKEN, flatten_conversation, is_message
from .image_io import DEFAULT_TIMEOUT, IMAGE_TYPES, is_image_part, load_image, to_rgb

__all__ = ["IMAGE_TOKEN", "GILLProcessor", "img_token_strings", "load_image", "to_rgb"]

SANE_MODEL_MAX_LENGTH = 10_000_000  # tokenizers without a limit report ~1e30


def img_token_strings(num_img_tokens: int) -> list[str]:
    return [f"[IMG{i}]" for i in range(num_img_tokens)]


def _is_single_sample(inputs) -> bool:
    if isinstance(inputs, (str, dict, *IMAGE_TYPES)):
        return True
    return len(inputs) == 0 or not isinstance(inputs[0], (list, tuple))


def _is_one_image(value) -> bool:
    return isinstance(value, (str, dict, *IMAGE_TYPES))


class GILLProcessor(ProcessorMixin):
    """Tokenizer (with ``<|image|>`` and ``[IMG0..r-1]`` added) + CLIP image processor.

    Args:
        image_processor: the vision encoder's own image processor (CLIP, SigLIP or BLIP-2's).
        tokenizer: the LLM's tokenizer; the special tokens are added when missing.
        num_visual_tokens: k, placeholders per input image (``GILLConfig.num_visual_tokens``: the encoder's count).
        num_img_tokens: r, the ``[IMG]`` tokens appended to captions and produced by the model.
        chat_template: a jinja string, a built-in name (``"gill"``, ``"minigpt5"``) or a dict of named templates;
            default: the tokenizer's own template, else ``"gill"`` (see ``gill_hf.chat_templates``).
        context_length: the LLM's context window in tokens; default ``tokenizer.model_max_length`` when set.
        image_timeout: seconds allowed for downloading one image URL.
    """

    def __init__(self, image_processor=None, tokenizer=None, num_visual_tokens: int = 4, num_img_tokens: int = 8,
                 chat_template=None, context_length: int | None = None, image_timeout: float = DEFAULT_TIMEOUT,
                 **kwargs):
        self.num_visual_tokens = num_visual_tokens
        self.num_img_tokens = num_img_tokens
        self.context_length = context_length
        self.image_timeout = image_timeout
        missing = [t for t in [IMAGE_TOKEN, *img_token_strings(num_img_tokens)]
                   if t not in tokenizer.get_vocab()]
        if missing:
            tokenizer.add_tokens(missing, special_tokens=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        if chat_template is None:
            chat_template = getattr(tokenizer, "chat_template", None)
        if isinstance(chat_template, str):
            chat_template = BUILTIN_CHAT_TEMPLATES.get(chat_template, chat_template)
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """As ``ProcessorMixin.from_pretrained``, with the PIL image backend by default: it resizes as the original
        (transformers' torchvision backend differs by up to 0.015 in pixel values)."""
        kwargs.setdefault("backend", "pil")
        with warnings.catch_warnings():  # transformers 5.24 reads additional_chat_templates/*.jinja without
            # closing the files (processing_utils.get_processor_dict); the files are read whole, nothing is lost
            warnings.filterwarnings("ignore", message="unclosed file .*additional_chat_templates",
                                    category=ResourceWarning)
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ---- token ids ----
    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)

    @property
    def img_token_ids(self) -> list[int]:
        return self.tokenizer.convert_tokens_to_ids(img_token_strings(self.num_img_tokens))

    # ---- context window ----
    @property
    def context_limit(self) -> int | None:
        """The LLM's context window: ``context_length``, else a sane ``tokenizer.model_max_length``, else None."""
        limit, _ = self._limit(None)
        return limit

    def _limit(self, max_length: int | None) -> tuple[int | None, str | None]:
        """(limit, where it comes from): the smaller of ``max_length`` and the context window."""
        found = []
        if max_length is not None:
            if max_length < 1:
                raise ValueError(f"max_length must be >= 1, got {max_length}")
            found.append((max_length, "max_length"))
        model_max = getattr(self.tokenizer, "model_max_length", None)
        if self.context_length is not None:
            found.append((self.context_length, "the processor's context_length"))
        elif model_max is not None and model_max < SANE_MODEL_MAX_LENGTH:
            found.append((int(model_max), "tokenizer.model_max_length"))
        return min(found) if found else (None, None)

    def check_context(self, length: int, max_new_tokens: int = 0) -> None:
        """Raise ``ValueError`` if ``length`` prompt tokens + ``max_new_tokens`` exceed the context window."""
        limit, source = self._limit(None)
        if limit is not None and length + max_new_tokens > limit:
            extra = f" + {max_new_tokens} new tokens" if max_new_tokens else ""
            raise ValueError(f"the prompt is {length} tokens long{extra}, more than the context window of {limit} "
                             f"tokens ({source}); shorten it or encode it with truncation=True")

    # ---- chat ----
    def apply_chat_template(self, conversation, chat_template=None, **kwargs):
        """``ProcessorMixin.apply_chat_template`` for GILL: image parts become ``<|image|>`` inside each message's
        content string before the template runs (so text-only LLM templates work), and their sources (``image``,
        ``url``, ``path``, ``base64``) are encoded in reading order. ``chat_template`` is a name of this
        processor's templates, ``"gill"`` / ``"minigpt5"``, or a jinja string; default: the processor's own.

        With ``tokenize=True, return_dict=True`` returns this processor's ``__call__`` output (pass its options in
        ``processor_kwargs``); otherwise the prompt string(s) or ``input_ids``.
        """
        for flag in ("sanitize_control_tokens", "return_assistant_tokens_mask"):
            if kwargs.get(flag):
                raise ValueError(f"GILLProcessor.apply_chat_template does not support {flag}=True")
        batched = isinstance(conversation, (list, tuple)) and len(conversation) > 0 \
            and isinstance(conversation[0], (list, tuple))
        conversations = list(conversation) if batched else [conversation]
        flat, images = zip(*(flatten_conversation(c, i) for i, c in enumerate(conversations)))
        processor_kwargs = dict(kwargs.pop("processor_kwargs", None) or {})
        if kwargs.get("tokenize") and "images" not in processor_kwargs:
            for i, sources in enumerate(images):
                if any(source is None for source in sources):
                    raise ValueError(f"conversation {i} has an image part without 'image', 'url', 'path' or "
                                     f"'base64'; give the sources there or as processor_kwargs={{'images': ...}}")
            processor_kwargs["images"] = list(images) if batched else images[0]
        return super().apply_chat_template(list(flat) if batched else flat[0],
                                           chat_template=self._template(chat_template),
                                           processor_kwargs=processor_kwargs, **kwargs)

    def _template(self, name: str | None) -> str:
        own = self.chat_template
        if isinstance(own, dict) and name in own:
            return own[name]
        if name in BUILTIN_CHAT_TEMPLATES:
            return BUILTIN_CHAT_TEMPLATES[name]
        if name is None:
            return (own.get("default") if isinstance(own, dict) else own) or GILL_CHAT_TEMPLATE
        return name

    # ---- public API ----
    def __call__(self, inputs=None, images=None, text=None, videos=None, audio=None, *, padding=True,
                 truncation=False, max_length: int | None = None, pad_to_multiple_of: int | None = None,
                 padding_side: str | None = None, truncation_side: str = "left", add_special_tokens: bool = True,
                 split_special_tokens: bool | None = None, return_tensors="pt") -> BatchFeature:
        """Encode one sample or a batch: ``inputs`` (list of parts, see the module docstring) or ``text`` +
        ``images``. ``images`` is one image, a flat list (taken in placeholder order across the texts) or one list
        per text; without ``text`` a flat list gives one sample per image.

        Args:
            padding: True / "longest" (default, unlike tokenizers), "max_length", or False / "do_not_pad".
            truncation: True / "longest_first" cuts prompts longer than the limit (the smaller of ``max_length``
                and the context window) from ``truncation_side`` ("left" by default, keeping the end of the
                prompt), never through an image: a cut image is dropped whole with its pixels, a leading BOS is
                kept, and a warning says so. Without it a prompt over the limit is a ``ValueError`` naming its
                length and the limit (unlike tokenizers, which keep it).
            max_length, pad_to_multiple_of, padding_side (default ``tokenizer.padding_side``), return_tensors
                ("pt", "np" or None for lists): as in transformers tokenizers.
            add_special_tokens: put BOS at the start of the first text segment.
            split_special_tokens: tokenize special-token strings as text; default False for ``text=``, True (and
                fixed) for str parts.

        Returns ``input_ids`` and ``attention_mask`` ``(B, T)`` and, when images are kept, ``pixel_values``
        ``(N_images, 3, H, W)`` in reading order across the batch.
        """
        if videos is not None or audio is not None:
            raise ValueError("GILLProcessor takes text and images only (got videos or audio)")
        if inputs is not None and (text is not None or images is not None):
            raise ValueError("pass either `inputs` (a list of parts) or `text` / `images`, not both")
        if inputs is not None:
            samples = self._samples_from_parts(inputs, add_special_tokens)
        elif text is not None or images is not None:
            split = bool(split_special_tokens)
            samples = [(items, add_special_tokens, split) for items in self._samples_from_text(text, images)]
        else:
            raise ValueError("GILLProcessor needs `inputs`, or `text` and/or `images`")
        if truncation_side not in ("left", "right"):
            raise ValueError(f"truncation_side must be 'left' or 'right', got {truncation_side!r}")
        limit, source = self._limit(max_length)
        truncation = truncation not in (False, None, "do_not_truncate")
        if truncation and limit is None:
            raise ValueError("truncation=True needs max_length: the tokenizer has no model_max_length and the "
                             "processor no context_length")
        sequences, kept_images = [], []
        for s, (items, add_bos, split) in enumerate(samples):
            ids, runs, bos_at = self._encode(items, add_bos, split)
            images_here = [value for kind, value in items if kind == "image"]
            if limit is not None and len(ids) > limit:
                if not truncation:
                    raise ValueError(f"prompt {s} is {len(ids)} tokens long ({len(runs)} images x "
                                     f"{self.num_visual_tokens} placeholders included), more than the limit of "
                                     f"{limit} tokens ({source}); shorten it or pass truncation=True to cut it "
                                     f"from the {truncation_side}")
                kept_ids, kept = self._truncate(ids, runs, bos_at, limit, truncation_side)
                warnings.warn(f"prompt {s}: {len(ids)} tokens cut from the {truncation_side} to {len(kept_ids)} "
                              f"(limit {limit}, {source}); {len(runs) - len(kept)} of its {len(runs)} images dropped",
                              stacklevel=2)
                ids, images_here = kept_ids, [images_here[j] for j in kept]
            sequences.append(ids)
            kept_images.extend(images_here)
        width = self._padded_width(sequences, padding, limit, pad_to_multiple_of, return_tensors)
        if width is None:
            data = {"input_ids": sequences, "attention_mask": [[1] * len(ids) for ids in sequences]}
        else:
            data = self._pad(sequences, padding_side or self.tokenizer.padding_side, width)
            if return_tensors is None:
                data = {key: value.tolist() for key, value in data.items()}
        if kept_images:
            rgb = [self._load(label, value) for label, value in kept_images]
            data["pixel_values"] = self.image_processor(rgb, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(data, tensor_type=return_tensors)

    def _samples_from_parts(self, inputs, add_special_tokens: bool) -> list[tuple[list, bool, bool]]:
        """Parts API -> per sample (items, add BOS, split special tokens)."""
        samples = [inputs] if _is_single_sample(inputs) else list(inputs)
        if not samples:
            raise ValueError("GILLProcessor got an empty batch")
        out = []
        for s, sample in enumerate(samples):
            parts = [sample] if _is_one_image(sample) else list(sample)
            if parts and all(is_message(p) for p in parts):
                messages, sources = flatten_conversation(parts, s)
                prompt = super().apply_chat_template(messages, chat_template=self._template(None))
                if any(source is None for source in sources):
                    raise ValueError(f"sample {s}: an image part has no 'image', 'url', 'path' or 'base64'")
                items = self._text_items(prompt, sources, s)
                starts_with_bos = self.tokenizer.bos_token is not None and prompt.startswith(self.tokenizer.bos_token)
                out.append((items, add_special_tokens and not starts_with_bos, False))
            else:
                out.append(([self._part_item(part, s, p) for p, part in enumerate(parts)], add_special_tokens, True))
        return out

    @staticmethod
    def _part_item(part, s: int, p: int) -> tuple[str, object]:
        where = f"sample {s}, part {p} ({type(part).__name__})"
        if isinstance(part, str):
            return "text", part
        if isinstance(part, IMAGE_TYPES) or is_image_part(part):
            return "image", (where, part)
        if isinstance(part, dict):
            if part.get("type") == "text" and isinstance(part.get("text"), str):
                return "text", part["text"]
            if is_message(part):
                raise ValueError(f"{where}: a sample is either all chat messages or all parts, not a mix")
            raise ValueError(f"{where}: unknown content part type {part.get('type')!r}; expected 'text' (with a "
                             f"str 'text') or 'image'")
        raise TypeError(f"{where}: interleaved inputs hold str, images (PIL, path, os.PathLike, bytes, numpy, "
                        f"torch) or dict parts")

    def _samples_from_text(self, text, images) -> list[list]:
        """``text`` / ``images`` -> per sample items, images at their ``<|image|>`` places."""
        texts = [text] if isinstance(text, str) else text
        if texts is not None:
            if not isinstance(texts, (list, tuple)) or not texts:
                raise TypeError(f"text must be a str or a non-empty list of str, got {type(text).__name__}")
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise TypeError(f"text {i} must be a str, got {type(t).__name__}")
        per_sample = self._images_per_sample(images, None if texts is None else [t.count(IMAGE_TOKEN) for t in texts])
        if texts is None:
            return [[("image", (f"sample {s}, image {j} ({type(v).__name__})", v)) for j, v in enumerate(imgs)]
                    for s, imgs in enumerate(per_sample)]
        return [self._text_items(t, imgs, s) for s, (t, imgs) in enumerate(zip(texts, per_sample))]

    @staticmethod
    def _images_per_sample(images, counts: list[int] | None) -> list[list]:
        if images is None:
            flat, nested = [], None
        elif _is_one_image(images):
            flat, nested = [images], None
        elif isinstance(images, (list, tuple)):
            is_list = [isinstance(x, (list, tuple)) for x in images]
            if any(is_list) and not all(is_list):
                raise TypeError("images must be one image, a flat list of images or one list per text, not a mix")
            flat, nested = (None, [list(x) for x in images]) if images and all(is_list) else (list(images), None)
        else:
            raise TypeError(f"images must be one image (PIL, path, URL, base64, bytes, numpy, torch, image part) "
                            f"or a list of them, got {type(images).__name__}")
        if counts is None:  # images only
            return nested if nested is not None else [[image] for image in flat]
        n_placeholders = f"'{IMAGE_TOKEN}' placeholders"
        if nested is None:
            if len(flat) != sum(counts):
                raise ValueError(f"the text holds {sum(counts)} {n_placeholders} but {len(flat)} images were given; "
                                 f"put one {IMAGE_TOKEN} where each image goes")
            starts = np.cumsum([0, *counts])
            nested = [flat[starts[i]:starts[i + 1]] for i in range(len(counts))]
        if len(nested) != len(counts):
            raise ValueError(f"{len(nested)} image lists for {len(counts)} texts")
        for i, (imgs, count) in enumerate(zip(nested, counts)):
            if len(imgs) != count:
                raise ValueError(f"text {i} holds {count} {n_placeholders} but {len(imgs)} images were given for it")
        return nested

    @staticmethod
    def _text_items(text: str, images: list, s: int) -> list[tuple[str, object]]:
        """Split ``text`` at each ``<|image|>`` into text items and the images in order."""
        segments = text.split(IMAGE_TOKEN)
        if len(segments) - 1 != len(images):
            raise ValueError(f"text {s} holds {len(segments) - 1} '{IMAGE_TOKEN}' placeholders but {len(images)} "
                             f"images were given for it")
        items = [("text", segments[0])] if segments[0] else []
        for j, (image, segment) in enumerate(zip(images, segments[1:])):
            items.append(("image", (f"sample {s}, image {j} ({type(image).__name__})", image)))
            if segment:
                items.append(("text", segment))
        return items

    def _encode(self, items, add_bos: bool, split_special_tokens: bool) -> tuple[list[int], list[int], int | None]:
        """Items -> (ids, start of each image's placeholder run, position of the added BOS or None)."""
        ids, runs, bos_at = [], [], None
        bos = self.tokenizer.bos_token_id if add_bos else None
        for kind, value in items:
            if kind == "text":
                if bos is not None and bos_at is None:
                    bos_at = len(ids)
                    ids.append(bos)
                ids.extend(self.tokenizer(value, add_special_tokens=False,
                                          split_special_tokens=split_special_tokens)["input_ids"])
            else:
                runs.append(len(ids))
                ids.extend([self.image_token_id] * self.num_visual_tokens)
        if bos is not None and bos_at is None:
            bos_at = len(ids)
            ids.append(bos)
        return ids, runs, bos_at

    def _truncate(self, ids: list[int], runs: list[int], bos_at: int | None, limit: int,
                  side: str) -> tuple[list[int], list[int]]:
        """Keep at most ``limit`` ids, cutting only between image runs -> (ids, indices of the kept images)."""
        k = self.num_visual_tokens
        if side == "right":
            end = limit
            for start in runs:
                if start < end < start + k:
                    end = start
            return ids[:end], [j for j, start in enumerate(runs) if start + k <= end]
        cut = len(ids) - limit
        keep_bos = bos_at is not None and bos_at < cut
        cut += keep_bos
        for start in runs:
            if start < cut < start + k:
                cut = start + k
        return ids[bos_at:bos_at + 1] * keep_bos + ids[cut:], [j for j, start in enumerate(runs) if start >= cut]

    def _padded_width(self, sequences, padding, limit, pad_to_multiple_of, return_tensors) -> int | None:
        """Row width after padding, or None for unpadded rows."""
        if padding in (False, "do_not_pad"):
            lengths = sorted({len(s) for s in sequences})
            if return_tensors is not None and len(lengths) > 1:
                raise ValueError(f"padding=False gives rows of lengths {lengths}, which cannot form one tensor; "
                                 f"pass padding=True or return_tensors=None")
            return None if return_tensors is None else lengths[0]
        if padding in (True, "longest"):
            width = max(len(s) for s in sequences)
        elif padding == "max_length":
            if limit is None:
                raise ValueError("padding='max_length' needs max_length (no context window is known)")
            width = limit
        else:
            raise ValueError(f"padding must be True, False, 'longest', 'max_length' or 'do_not_pad', got {padding!r}")
        if pad_to_multiple_of:
            width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
        return width

    def _load(self, where: str, source) -> Image.Image:
        try:
            return to_rgb(load_image(source, self.image_timeout))
        except (ValueError, TypeError) as err:
            raise type(err)(f"{where}: {err}") from err

    def preprocess_images(self, images) -> torch.Tensor:
        """Images (any source ``load_image`` reads, any PIL mode) -> CLIP ``pixel_values`` ``(N, 3, H, W)`` float32."""
        rgb = [self._load(f"image {i} ({type(image).__name__})", image) for i, image in enumerate(images)]
        return self.image_processor(rgb, return_tensors="pt")["pixel_values"]

    def encode_captions(self, captions, max_length: int = 32) -> BatchFeature:
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

    def _pad(self, sequences: list[list[int]], padding_side: str, width: int | None = None) -> dict:
        """Rows padded on ``padding_side`` to ``width`` (default: the longest) -> int64 ``(B, width)`` arrays."""
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        width = max(max(len(s) for s in sequences), width or 0)
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
