"""Interleaved decoding for GILL: KV-cached, batched (left padding), text with [IMG] blocks, hidden states captured.

When a row picks [IMG0], the whole block [IMG0..r-1] is fed in ONE cached forward; its
``hidden_states[config.hidden_layer]`` at the r positions are kept (for retrieval and the decision) together with
the mapper inputs (the same states, or for ``voken_feature_position="predicting"`` the states one position
earlier, as ``GILLForConditionalGeneration.forward`` uses in training). Rows that feed one text token while another
row feeds a block are left-padded inside the step, so every row sees exactly what it would see alone.

Shapes: B rows, T prompt tokens, r [IMG] tokens, f feature width, L x D diffusion conditioning.
"""

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.generation.logits_process import (LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)


@dataclass
class InterleavedGenerationConfig:
    """Decoding options.

    ``max_new_tokens`` bounds all new tokens, the r tokens of each [IMG] block included; [IMG0] is only allowed
    while a whole block still fits. ``min_text_tokens``: text tokens required since the answer start or the last
    image before [IMG0] may appear. ``force_image_after``: force [IMG0] once that many text tokens were produced
    since the start / last image (0 = an image first; a list gives one value per row). ``gen_scale_factor`` / ``ret_scale_factor`` > 1 apply the
    original's boost ``logit[IMG0] = |logit[IMG0]| * factor`` (GILL shares the token, so both multiply it).
    """

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    eos_token_id: int | list[int] | None = None  # None: the LLM's own
    stop_strings: Sequence[str] = ()
    min_text_tokens: int = 0
    max_images: int | None = None  # None: no limit
    force_image_after: int | Sequence[int | None] | None = None  # one value for all rows, or one per row
    gen_scale_factor: float = 1.0
    ret_scale_factor: float = 1.0
    use_cache: bool = True

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"sampling needs temperature > 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")
        for name in ("top_k", "min_text_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.max_images is not None and self.max_images < 0:
            raise ValueError(f"max_images must be >= 0 or None, got {self.max_images}")
        forced = self.force_image_after if isinstance(self.force_image_after, Sequence) else [self.force_image_after]
        if any(n is not None and n < 0 for n in forced):
            raise ValueError(f"force_image_after must be >= 0 or None, got {self.force_image_after}")
        if self.gen_scale_factor <= 0 or self.ret_scale_factor <= 0:
            raise ValueError("gen_scale_factor and ret_scale_factor must be > 0")
        if isinstance(self.stop_strings, str):
            self.stop_strings = (self.stop_strings,)


@dataclass
class GeneratedImageSlot:
    """One [IMG0..r-1] block of an answer: where it starts and the LLM states captured for it."""

    position: int  # index of [IMG0] among the row's new tokens
    hidden_states: torch.Tensor  # (r, f) hidden_states[hidden_layer] at [IMG0..r-1]: retrieval + decision use [0]
    voken_states: torch.Tensor  # (r, f) mapper input states (shifted by one for voken_feature_position="predicting")


@dataclass
class GILLGenerationOutput:
    """``sequences`` ``(B, T_new)`` new ids (padded after each row's end); ``parts[b]``: text strings and
    :class:`GeneratedImageSlot` in reading order (empty strings dropped)."""

    sequences: torch.LongTensor
    parts: list[list[str | GeneratedImageSlot]] = field(default_factory=list)

    @property
    def images(self) -> list[list[GeneratedImageSlot]]:
        return [[p for p in row if isinstance(p, GeneratedImageSlot)] for row in self.parts]

    @property
    def texts(self) -> list[str]:
        """The text of each row with the images left out."""
        return ["".join(p for p in row if isinstance(p, str)) for row in self.parts]

    def voken_states(self) -> torch.Tensor:
        """All images' mapper inputs stacked in reading order over the batch, ``(N_images, r, f)``."""
        slots = [s for row in self.images for s in row]
        if not slots:
            raise ValueError("the answer holds no image")
        return torch.stack([s.voken_states for s in slots])

    def img0_hidden_states(self) -> torch.Tensor:
        """``(N_images, f)`` states at each [IMG0]: the input of W_t2i and of the decision head."""
        slots = [s for row in self.images for s in row]
        if not slots:
            raise ValueError("the answer holds no image")
        return torch.stack([s.hidden_states[0] for s in slots])


def image_conditioning(model, voken_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(N, r, f)`` voken states -> ``prompt_embeds`` ``(N, L, D)`` and, for models trained with CFG dropout
    (MiniGPT-5), the mapped-null ``negative_prompt_embeds`` ``(N, L, D)`` (else None)."""
    with torch.no_grad():
        prompt_embeds = model.gen_embeddings(voken_states.to(model.adapter.w_t2i.weight))
        negative = None
        if model.config.cfg_dropout_prob > 0:
            negative = model.mapped_null_embedding().expand_as(prompt_embeds)
    return prompt_embeds, negative


def _check_prompt(model, input_ids, attention_mask, pixel_values, image_features):
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be (B, T) with T >= 1, got shape {tuple(input_ids.shape)}")
    if attention_mask is not None:
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")
        if (attention_mask[:, -1] == 0).any():
            raise ValueError("batched generation needs left padding: encode prompts with padding_side='left'")
    k = model.config.num_visual_tokens
    n_slots = int((input_ids == model.config.image_token_id).sum())
    given = image_features if image_features is not None else pixel_values
    n_images = 0 if given is None else given.shape[0]
    if n_slots != n_images * k:
        raise ValueError(f"the prompt holds {n_slots // k} image placeholders ({n_slots} tokens at k={k}) but "
                         f"{n_images} images were given")


def _eos_ids(model, cfg: InterleavedGenerationConfig) -> list[int]:
    eos = cfg.eos_token_id
    if eos is None:
        eos = model.language_model.generation_config.eos_token_id or model.config.text_config.eos_token_id
    if eos is None:
        return []
    return [eos] if isinstance(eos, int) else list(eos)


class _RowState:
    """Book-keeping of one row: its new tokens, images and whether it is done."""

    def __init__(self):
        self.tokens: list[int] = []
        self.text_since_image = 0
        self.slots: list[GeneratedImageSlot] = []
        self.block_pending = False  # [IMG0] chosen: the block is fed by the next forward
        self.finished = False


@torch.no_grad()
def generate_interleaved(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                         pixel_values: torch.Tensor | None = None, image_features: torch.Tensor | None = None,
                         generator: torch.Generator | None = None, tokenizer=None,
                         generation_config: InterleavedGenerationConfig | None = None,
                         **config_kwargs) -> GILLGenerationOutput:
    """Answer ``(B, T)`` left-padded prompts (``model.processor(..., padding_side="left")``) with text and images.

    Args:
        pixel_values / image_features: the prompt's images ``(N, 3, H, W)`` or pooled CLIP features ``(N, d)``.
        generator: drives sampling (``do_sample=True``).
        tokenizer: decodes text and checks stop strings; default ``model.processor.tokenizer``.
        generation_config / config_kwargs: :class:`InterleavedGenerationConfig` or its fields as keywords.
    """
    cfg = generation_config or InterleavedGenerationConfig(**config_kwargs)
    tokenizer = tokenizer or (model.processor.tokenizer if model.processor is not None else None)
    if tokenizer is None:
        raise ValueError("generate_interleaved needs a tokenizer: attach a processor to the model or pass one")
    _check_prompt(model, input_ids, attention_mask, pixel_values, image_features)
    device = model.adapter.logit_scale.device
    input_ids = input_ids.to(device)
    attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
    if image_features is None and pixel_values is not None:
        image_features = model.encode_images(pixel_values.to(device))
    decoder = _Decoder(model, cfg, tokenizer, generator, input_ids.shape[0])
    return decoder.run(model.embed_inputs(input_ids, image_features), attention_mask)


class _Decoder:
    """The decoding loop; one instance per call."""

    def __init__(self, model, cfg: InterleavedGenerationConfig, tokenizer, generator, batch_size: int):
        self.model, self.cfg, self.tokenizer, self.generator = model, cfg, tokenizer, generator
        self.r = model.config.num_img_tokens
        self.img_ids = model.img_token_ids.tolist()
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.eos_ids = _eos_ids(model, cfg)
        self.rows = [_RowState() for _ in range(batch_size)]
        forced = cfg.force_image_after
        self.force_after = list(forced) if isinstance(forced, Sequence) else [forced] * batch_size
        if len(self.force_after) != batch_size:
            raise ValueError(f"force_image_after has {len(self.force_after)} values for {batch_size} prompts")
        warpers = []
        if cfg.do_sample:
            if cfg.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(cfg.temperature))
            if cfg.top_k > 0:
                warpers.append(TopKLogitsWarper(cfg.top_k))
            if cfg.top_p < 1.0:
                warpers.append(TopPLogitsWarper(cfg.top_p))
        self.warpers = LogitsProcessorList(warpers)

    # ---- one forward over the step's new positions ----
    def _forward(self, new_embeds, full_embeds, mask, cache):
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T_total): left padding keeps positions exact
        width = new_embeds.shape[1]
        if cache is not None:
            logits, features, _ = self.model.run_language_model(
                new_embeds, mask, past_key_values=cache, position_ids=positions[:, -width:], use_cache=True,
                logits_to_keep=1)
        else:  # the original's way: recompute the whole sequence each step
            logits, features, _ = self.model.run_language_model(full_embeds, mask, position_ids=positions,
                                                                use_cache=False, logits_to_keep=1)
        return logits[:, -1].float(), features[:, -width:]

    def run(self, embeds: torch.Tensor, mask: torch.Tensor) -> GILLGenerationOutput:
        cache = DynamicCache() if self.cfg.use_cache else None
        new_embeds, full_embeds = embeds, embeds
        prev_last_features = None
        while True:
            last_logits, features = self._forward(new_embeds, full_embeds, mask, cache)  # (B, V), (B, W, f)
            self._capture_blocks(features, prev_last_features)
            prev_last_features = features[:, -1]
            self._choose(last_logits)
            if all(row.finished and not row.block_pending for row in self.rows):
                break
            step_ids, step_mask = self._next_step_inputs(mask)
            new_embeds = self.model.embed_tokens(step_ids)
            mask = torch.cat([mask, step_mask], dim=1)
            if cache is None:
                full_embeds = torch.cat([full_embeds, new_embeds], dim=1)
        return self._output()

    def _capture_blocks(self, features: torch.Tensor, prev_last_features: torch.Tensor | None):
        r = self.r
        for b, row in enumerate(self.rows):
            if not row.block_pending:
                continue
            at_token = features[b, -r:]  # (r, f): the block was fed right-aligned in this step
            if self.model.config.voken_feature_position == "at_token":
                voken = at_token
            else:  # MiniGPT-5: the state that predicts [IMG0], then those at [IMG0..r-2]
                voken = torch.cat([prev_last_features[b:b + 1], at_token[:-1]], dim=0)
            row.slots.append(GeneratedImageSlot(len(row.tokens) - r, at_token.clone(), voken.clone()))
            row.block_pending = False
            row.text_since_image = 0
            if len(row.tokens) >= self.cfg.max_new_tokens:
                row.finished = True

    def _image_allowed(self, row: _RowState) -> bool:
        cfg = self.cfg
        return (len(row.tokens) + self.r <= cfg.max_new_tokens and row.text_since_image >= cfg.min_text_tokens
                and (cfg.max_images is None or len(row.slots) < cfg.max_images))

    def _choose(self, logits: torch.Tensor):
        cfg, img0 = self.cfg, self.img_ids[0]
        logits[:, self.img_ids[1:]] = float("-inf")  # [IMG1..r-1] only ever follow [IMG0] as a block
        boosted = logits[:, img0]
        for factor in (cfg.ret_scale_factor, cfg.gen_scale_factor):
            if factor > 1.0:
                boosted = boosted.abs() * factor
        logits[:, img0] = boosted
        allowed = torch.tensor([self._image_allowed(row) for row in self.rows], device=logits.device)
        logits[:, img0] = logits[:, img0].masked_fill(~allowed, float("-inf"))
        if cfg.do_sample:
            scores = self.warpers(None, logits)
            probs = torch.softmax(scores, dim=-1)
            next_ids = torch.multinomial(probs, 1, generator=self.generator).squeeze(1)
        else:
            next_ids = logits.argmax(-1)
        for b, (row, token) in enumerate(zip(self.rows, next_ids.tolist())):
            if row.finished:
                continue
            if self.force_after[b] is not None and row.text_since_image >= self.force_after[b] and bool(allowed[b]):
                token = img0
            if token == img0:
                row.tokens.extend(self.img_ids)
                row.block_pending = True
                continue
            row.tokens.append(token)
            row.text_since_image += 1
            if token in self.eos_ids or len(row.tokens) >= cfg.max_new_tokens or self._hit_stop_string(row):
                row.finished = True

    def _hit_stop_string(self, row: _RowState) -> bool:
        if not self.cfg.stop_strings:
            return False
        text_ids = [t for t in row.tokens if t not in self.img_ids]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        return any(s in text for s in self.cfg.stop_strings)

    def _next_step_inputs(self, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each live row feeds its last token (or its whole [IMG] block), right-aligned; the rest is masked pad."""
        width = self.r if any(row.block_pending for row in self.rows) else 1
        ids = torch.full((len(self.rows), width), self.pad_id, dtype=torch.long, device=mask.device)
        step_mask = torch.zeros_like(ids)
        for b, row in enumerate(self.rows):
            if row.block_pending:
                ids[b] = torch.tensor(self.img_ids, device=mask.device)
                step_mask[b] = 1
            elif not row.finished:
                ids[b, -1] = row.tokens[-1]
                step_mask[b, -1] = 1
        return ids, step_mask

    def _output(self) -> GILLGenerationOutput:
        width = max(len(row.tokens) for row in self.rows)
        sequences = torch.full((len(self.rows), width), self.pad_id, dtype=torch.long)
        parts = []
        for b, row in enumerate(self.rows):
            sequences[b, :len(row.tokens)] = torch.tensor(row.tokens, dtype=torch.long)
            row_parts, start = [], 0
            for slot in row.slots:
                row_parts.append(self.tokenizer.decode(row.tokens[start:slot.position], skip_special_tokens=True))
                row_parts.append(slot)
                start = slot.position + self.r
            row_parts.append(self.tokenizer.decode(row.tokens[start:], skip_special_tokens=True))
            parts.append([p for p in row_parts if not isinstance(p, str) or p])
        return GILLGenerationOutput(sequences=sequences, parts=parts)
