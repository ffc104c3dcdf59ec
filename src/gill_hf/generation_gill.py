"""GILL generation on transformers' ``GenerationMixin``: GILL's [IMG] rules as a logits processor, [IMG] states kept.

``GILLForConditionalGeneration.generate`` is the stock ``GenerationMixin.generate`` (greedy, sampling, beams,
streamers, stopping criteria...) with three additions made here:

- :class:`GILLImageLogitsProcessor` enforces GILL's decoding rules from the ids alone, so every decoding strategy
  obeys them: [IMG1..r-1] follow [IMG0] in order and appear nowhere else; [IMG0] only while a whole block fits the
  budget, after ``min_text_tokens`` text tokens, up to ``max_images``; ``force_image_after``; the original's
  ``gen_scale_factor`` / ``ret_scale_factor`` boost of [IMG0].
- the streamer never sees [IMG] or placeholder ids (:class:`ImageTokenFilterStreamer`).
- with ``return_dict_in_generate=True`` the result is a :class:`GILLGenerateOutput` holding, per [IMG] block, the
  ``hidden_states[config.hidden_layer]`` states the mapper, retrieval and the decision need (one extra forward over
  the final sequences, run only when some row holds an image).

Shapes: B prompts, R = B x rows per prompt (beams / return sequences), T prompt length, r [IMG] tokens, f feature width.
"""

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers import (GenerationConfig, GenerationMixin, LogitsProcessor, LogitsProcessorList,
                          SuppressTokensLogitsProcessor)
from transformers.generation.streamers import BaseStreamer
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)

DEFAULT_MAX_NEW_TOKENS = 32  # a GILL model's default answer budget ([IMG] blocks included)
TRANSFORMERS_DEFAULT_NEW_TOKENS = 20  # what generate() produces when neither max_length nor max_new_tokens is set
# GILL's own generation-config fields and their defaults (saved in generation_config.json with the standard ones).
GILL_GENERATION_DEFAULTS = dict(force_image_after=None, min_text_tokens=0, max_images=None, gen_scale_factor=1.0,
                                ret_scale_factor=1.0)


def gill_generation_config(config, base: GenerationConfig | None = None) -> GenerationConfig:
    """The default generation config of a GILL model: the LLM's own (``base``: eos / bos / pad ids) + GILL fields."""
    values = base.to_dict() if base is not None else {}
    values = {k: v for k, v in values.items() if k != "transformers_version" and not k.startswith("_")}
    text = config.text_config
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if values.get(name) is None and getattr(text, name, None) is not None:
            values[name] = getattr(text, name)
    if values.get("max_new_tokens") is None and values.get("max_length") is None:
        values["max_new_tokens"] = DEFAULT_MAX_NEW_TOKENS
    return GenerationConfig(**{**GILL_GENERATION_DEFAULTS, **values})


class GILLImageLogitsProcessor(LogitsProcessor):
    """GILL's [IMG] rules on ``(R, V)`` scores, computed from ``input_ids`` ``(R, T + n)`` alone (no state).

    Args:
        img_token_ids: ids of [IMG0..r-1].
        prompt_length: T, the width of the prompt in ``input_ids`` (0 for ``inputs_embeds`` prompts).
        max_new_tokens: the new-token budget; [IMG0] only while all r tokens of its block still fit.
        min_text_tokens: text tokens needed since the answer start / the last image before [IMG0] may appear.
        max_images: images per answer (None: no limit).
        force_image_after: force [IMG0] once this many text tokens followed the start / last image; one value or
            one per prompt (None entries: never forced).
        gen_scale_factor, ret_scale_factor: the original's boost ``logit = |logit| * factor`` of [IMG0] (> 1 only).
        rows_per_prompt: rows of ``input_ids`` per prompt (``num_beams`` or ``num_return_sequences``).

    A forced image that cannot be met (``max_images=0``, or its text, ``min_text_tokens`` and its r tokens exceed
    ``max_new_tokens``) is a ``ValueError`` here, before decoding.
    """

    def __init__(self, img_token_ids: Sequence[int], prompt_length: int, max_new_tokens: int,
                 min_text_tokens: int = 0, max_images: int | None = None,
                 force_image_after: int | Sequence[int | None] | None = None, gen_scale_factor: float = 1.0,
                 ret_scale_factor: float = 1.0, rows_per_prompt: int = 1, num_prompts: int = 1):
        _check_count("min_text_tokens", min_text_tokens)
        _check_count("max_images", max_images, optional=True)
        if gen_scale_factor <= 0 or ret_scale_factor <= 0:
            raise ValueError("gen_scale_factor and ret_scale_factor must be > 0")
        forced = list(force_image_after) if isinstance(force_image_after, Sequence) else \
            [force_image_after] * num_prompts
        if len(forced) != num_prompts:
            raise ValueError(f"force_image_after has {len(forced)} values for {num_prompts} prompts")
        for n in forced:
            _check_count("force_image_after", n, optional=True, shown=force_image_after)
        _check_forced_image_fits(force_image_after, [n for n in forced if n is not None], len(img_token_ids),
                                 max_new_tokens, min_text_tokens, max_images)
        self.forced_prompts = [n is not None for n in forced]  # prompts that must get an image
        self.img_ids = torch.tensor(list(img_token_ids), dtype=torch.long)
        self.r = len(self.img_ids)
        self.prompt_length, self.max_new_tokens = prompt_length, max_new_tokens
        self.min_text_tokens, self.max_images = min_text_tokens, max_images
        never = torch.iinfo(torch.long).max
        self.force_after = torch.tensor([never if n is None else n for n in forced]).repeat_interleave(rows_per_prompt)
        self.factors = [f for f in (ret_scale_factor, gen_scale_factor) if f > 1.0]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        device, r = scores.device, self.r
        img_ids, force_after = self.img_ids.to(device), self.force_after.to(device)
        new = input_ids[:, self.prompt_length:].to(device)  # (R, n)
        n = new.shape[1]
        match = new.unsqueeze(-1) == img_ids  # (R, n, r)
        slot = match.long().argmax(-1).masked_fill(~match.any(-1), -1)  # (R, n): 0..r-1 at [IMG] tokens, else -1
        last = slot[:, -1] if n else torch.full((new.shape[0],), -1, device=device)
        in_block = (last >= 0) & (last < r - 1)
        block_ends = torch.arange(1, n + 1, device=device) * (slot == r - 1)  # 1-based positions of [IMG{r-1}]
        text_since_image = n - (block_ends.amax(1) if n else torch.zeros_like(last))  # (R,)
        allowed = ~in_block & (text_since_image >= self.min_text_tokens) & torch.tensor(n + r <= self.max_new_tokens,
                                                                                         device=device)
        if self.max_images is not None:
            allowed &= (slot == 0).sum(1) < self.max_images

        scores = scores.clone()
        img0 = scores[:, img_ids[0]]
        for factor in self.factors:
            img0 = img0.abs() * factor
        scores[:, img_ids[1:]] = float("-inf")
        scores[:, img_ids[0]] = img0.masked_fill(~allowed, float("-inf"))
        forced = in_block | (allowed & (text_since_image >= force_after))
        if forced.any():
            target = torch.where(in_block, img_ids[(last + 1).clamp(max=r - 1)], img_ids[0])  # (R,)
            scores[forced] = float("-inf")
            scores[forced, target[forced]] = 0.0
        return scores


def _check_count(name: str, value, optional: bool = False, shown=None):
    """``value`` must be an int >= 0 (or None when ``optional``); errors show ``shown`` (default ``value``)."""
    if value is None and optional:
        return
    shown = value if shown is None else shown
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an int{' or None' if optional else ''}, got {shown!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0{' or None' if optional else ''}, got {shown}")


def _check_forced_image_fits(force_image_after, forced: list[int], r: int, max_new_tokens: int,
                             min_text_tokens: int, max_images: int | None):
    """A forced [IMG] block must be possible: images allowed, and its text + r tokens within the budget."""
    if not forced:
        return
    if max_images == 0:
        raise ValueError(f"force_image_after={force_image_after} cannot be met with max_images=0")
    text = max(max(forced), min_text_tokens)  # [IMG0] waits for min_text_tokens too
    if text + r > max_new_tokens:
        why = f"min_text_tokens={min_text_tokens}" if min_text_tokens > max(forced) else "its text"
        raise ValueError(f"force_image_after={force_image_after} cannot be met: the image needs {text + r} new "
                         f"tokens ({why} + the {r} [IMG] tokens) but the budget is {max_new_tokens}")


class ImageTokenFilterStreamer(BaseStreamer):
    """Passes ids on to ``streamer`` without the [IMG] and placeholder ids (an all-[IMG] step is not passed on)."""

    def __init__(self, streamer: BaseStreamer, hidden_ids: Sequence[int]):
        self.streamer, self.hidden_ids = streamer, torch.tensor(list(hidden_ids), dtype=torch.long)
        self._first = True

    def put(self, value: torch.Tensor):
        if value.dim() == 2:
            if value.shape[0] != 1:
                raise ValueError(f"streaming works on one sequence at a time, got a batch of {value.shape[0]}")
            value = value[0]
        kept = value[~torch.isin(value, self.hidden_ids.to(value.device))]
        if self._first or kept.numel():  # the first call is the prompt (TextStreamer's skip_prompt relies on it)
            self.streamer.put(kept)
        self._first = False

    def end(self):
        self.streamer.end()


@dataclass
class GeneratedImageSlot:
    """One [IMG0..r-1] block of an answer: where it starts and the LLM states captured for it."""

    position: int  # index of [IMG0] among the row's new tokens
    hidden_states: torch.Tensor = field(repr=False)  # (r, f) hidden_states[hidden_layer] at [IMG0..r-1]
    voken_states: torch.Tensor = field(repr=False)  # (r, f) mapper inputs (one earlier for "predicting")


@dataclass
class GILLGenerateOutput(ModelOutput):
    """``generate(..., return_dict_in_generate=True)``: transformers' fields plus GILL's.

    ``sequences`` ``(R, T + n)`` as transformers returns them (prompt + new ids; new ids only for ``inputs_embeds``
    prompts); ``image_slots[b]``: the :class:`GeneratedImageSlot` of row b; ``parts[b]``: its text strings and slots in
    reading order (empty strings dropped; None without a tokenizer); ``prompt_length``: T;
    ``missing_forced_images[b]``: True when row b was to get a forced image but stopped before it (also warned).
    """

    sequences: torch.LongTensor | None = None
    sequences_scores: torch.FloatTensor | None = None
    scores: tuple | None = None
    logits: tuple | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    beam_indices: torch.LongTensor | None = None
    cache: object | None = None
    image_slots: list | None = None
    parts: list | None = None
    prompt_length: int | None = None
    missing_forced_images: list | None = None

    @property
    def new_tokens(self) -> torch.LongTensor:
        """``(R, n)`` the generated ids alone."""
        return self.sequences[:, self.prompt_length:]

    @property
    def images(self) -> list[list[GeneratedImageSlot]]:
        return self.image_slots

    @property
    def texts(self) -> list[str]:
        """The text of each row with the images left out."""
        return ["".join(p for p in row if isinstance(p, str)) for row in self.parts]

    def _all_slots(self) -> list[GeneratedImageSlot]:
        slots = [s for row in self.image_slots for s in row]
        if not slots:
            raise ValueError("the answer holds no image")
        return slots

    def voken_states(self) -> torch.Tensor:
        """All images' mapper inputs stacked in reading order over the batch, ``(N_images, r, f)``."""
        return torch.stack([s.voken_states for s in self._all_slots()])

    def img0_hidden_states(self) -> torch.Tensor:
        """``(N_images, f)`` states at each [IMG0]: the input of W_t2i and of the decision head."""
        return torch.stack([s.hidden_states[0] for s in self._all_slots()])


def image_conditioning(model, voken_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(N, r, f)`` voken states -> ``prompt_embeds`` ``(N, L, D)`` and, for models trained with CFG dropout
    (MiniGPT-5), the mapped-null ``negative_prompt_embeds`` ``(N, L, D)`` (else None)."""
    with torch.no_grad():
        prompt_embeds = model.gen_embeddings(voken_states.to(model.adapter.w_t2i.weight))
        negative = None
        if model.config.cfg_dropout_prob > 0:
            negative = model.mapped_null_embedding().expand_as(prompt_embeds)
    return prompt_embeds, negative


# generate() hands these to the decoding loop, which passes them on to forward(); they are not model inputs.
GENERATE_ONLY_KWARGS = ("tokenizer", "assistant_tokenizer")


class GILLGenerationMixin(GenerationMixin):
    """``generate`` of :class:`~gill_hf.GILLForConditionalGeneration`: the stock loop plus GILL's rules and states."""

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, cache=None, attention_mask=None,
                                      inputs_embeds=None, is_first_iteration=False, **kwargs):
        """transformers' own: the visual prefix (``mm_encoder_outputs``) goes in on the first step only (every step
        without a cache); generate-only arguments are kept out of ``forward``."""
        inputs = super().prepare_inputs_for_generation(
            input_ids, next_sequence_length=next_sequence_length, cache=cache, attention_mask=attention_mask,
            inputs_embeds=inputs_embeds, is_first_iteration=is_first_iteration, **kwargs)
        for key in GENERATE_ONLY_KWARGS:
            inputs.pop(key, None)
        return inputs

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, generation_config: GenerationConfig | None = None,
                 logits_processor: LogitsProcessorList | None = None, stopping_criteria=None,
                 streamer: BaseStreamer | None = None, **kwargs):
        """``GenerationMixin.generate`` on interleaved prompts (``processor(..., padding_side="left")`` output).

        Takes every standard option, and GILL's (also settable in ``generation_config``): ``force_image_after``,
        ``min_text_tokens``, ``max_images``, ``gen_scale_factor``, ``ret_scale_factor`` (see
        :class:`GILLImageLogitsProcessor`). Returns what transformers returns; with ``return_dict_in_generate=True``
        a :class:`GILLGenerateOutput` with the [IMG] states of every image.
        """
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        base = generation_config if generation_config is not None else self.generation_config
        gill = {k: kwargs.pop(k) if k in kwargs else getattr(base, k, d) for k, d in GILL_GENERATION_DEFAULTS.items()}
        pixel_values = kwargs.pop("pixel_values", None)
        encoded = (kwargs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None and pixel_values is not None:
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
        if pixel_values is not None:  # encoded once here; transformers feeds it on the first step
            encoded = self.get_image_features(pixel_values.to(self.device))
            kwargs["mm_encoder_outputs"] = {"image": BaseModelOutputWithPooling(pooler_output=encoded.pooler_output)}
        prefix = None if encoded is None else encoded.pooler_output  # (N, k, e), kept: generate expands its copy
        inputs_embeds = kwargs.get("inputs_embeds")
        attention_mask = kwargs.get("attention_mask")
        prompt = self._check_prompt(input_ids, inputs_embeds, attention_mask, prefix)

        num_beams = kwargs.get("num_beams", base.num_beams) or 1
        rows_per_prompt = num_beams if num_beams > 1 else (kwargs.get("num_return_sequences",
                                                                      base.num_return_sequences) or 1)
        budget, context_full = self._new_token_budget(prompt["length"], base, kwargs)
        rules = GILLImageLogitsProcessor(self.config.img_token_ids, prompt["ids_width"], budget,
                                         rows_per_prompt=rows_per_prompt, num_prompts=prompt["batch"], **gill)
        suppress = [] if self.config.mask_image_token_logit else [  # a generated placeholder has no image
            SuppressTokensLogitsProcessor([self.config.image_token_id], device=self.device)]
        processors = LogitsProcessorList([*(logits_processor or []), *suppress, rules])  # last: its forcing wins
        if streamer is not None:
            streamer = ImageTokenFilterStreamer(streamer, [*self.config.img_token_ids, self.config.image_token_id])
        out = super().generate(input_ids, generation_config=generation_config, logits_processor=processors,
                               stopping_criteria=stopping_criteria, streamer=streamer, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        if context_full is not None and sequences.shape[1] - prompt["ids_width"] >= budget:
            logger.warning(f"generation stopped at the LLM's context window ({context_full} positions): the prompt "
                           f"({prompt['length']}) + the answer filled it")
        missing = self._missing_forced_images(sequences[:, prompt["ids_width"]:], rules.forced_prompts)
        if isinstance(out, torch.Tensor):
            return out
        slots = self._image_slots(sequences, prompt, prefix, sequences.shape[0] // prompt["batch"])
        return GILLGenerateOutput(**dict(out.items()), image_slots=slots, prompt_length=prompt["ids_width"],
                                  parts=self._answer_parts(sequences[:, prompt["ids_width"]:], slots),
                                  missing_forced_images=missing)

    # ---- checks at the boundary ----
    def _check_prompt(self, input_ids, inputs_embeds, attention_mask, prefix) -> dict:
        """Validate the prompt; returns its batch size, width in ``sequences`` and length in LLM positions."""
        if input_ids is None and inputs_embeds is None:
            raise ValueError("generate needs input_ids (processor output) or inputs_embeds")
        if input_ids is not None and (input_ids.dim() != 2 or input_ids.shape[1] == 0):
            raise ValueError(f"input_ids must be (B, T) with T >= 1, got shape {tuple(input_ids.shape)}")
        ref = input_ids if input_ids is not None else inputs_embeds[..., 0]
        if attention_mask is not None:
            if attention_mask.shape != ref.shape:
                raise ValueError(f"attention_mask {tuple(attention_mask.shape)} != prompt {tuple(ref.shape)}")
            if (attention_mask[:, -1] == 0).any():
                raise ValueError("batched generation needs left padding: encode prompts with padding_side='left'")
        k = self.config.num_visual_tokens
        n_slots = 0 if input_ids is None else int((input_ids == self.config.image_token_id).sum())
        n_images = 0 if prefix is None else prefix.shape[0]
        if inputs_embeds is None and n_slots != n_images * k:
            raise ValueError(f"the prompt holds {n_slots // k} image placeholders ({n_slots} tokens at k={k}) but "
                             f"{n_images} images were given")
        if inputs_embeds is not None and prefix is not None:
            raise ValueError("images with inputs_embeds: merge them into inputs_embeds (model.embed_inputs) or pass "
                             "input_ids")
        return {"batch": ref.shape[0], "ids_width": 0 if inputs_embeds is not None else ref.shape[1],
                "length": ref.shape[1], "input_ids": input_ids, "inputs_embeds": inputs_embeds,
                "attention_mask": attention_mask}

    def _new_token_budget(self, prompt_length: int, base: GenerationConfig, kwargs: dict) -> tuple[int, int | None]:
        """New tokens allowed (``max_new_tokens``, or ``max_length`` minus the prompt) capped by the LLM's context
        window; returns the budget and the window when it is the binding limit."""
        max_new = kwargs.get("max_new_tokens", base.max_new_tokens)
        if max_new is None:
            max_length = kwargs.get("max_length", base.max_length)
            max_new = TRANSFORMERS_DEFAULT_NEW_TOKENS if max_length is None else max_length - prompt_length
        if max_new < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new}")
        window = getattr(self.config.text_config, "max_position_embeddings", None)
        if window is None or prompt_length + max_new <= window:
            return max_new, None
        if prompt_length >= window:
            raise ValueError(f"the prompt is {prompt_length} tokens long but the LLM's context window is {window}: "
                             f"shorten it (or encode it with truncation=True)")
        kwargs["max_new_tokens"] = window - prompt_length
        kwargs.pop("max_length", None)
        return window - prompt_length, window

    def _missing_forced_images(self, new_tokens: torch.Tensor, forced_prompts: list[bool]) -> list[bool]:
        """Rows of ``(R, n)`` new ids that were to get a forced image but hold no complete [IMG] block (they
        stopped first: EOS, a stop string, a stopping criterion); a warning names them."""
        rows_per_prompt = new_tokens.shape[0] // len(forced_prompts)
        complete = (new_tokens == self.config.img_token_ids[-1]).any(1).tolist()  # [IMG{r-1}] ends a whole block
        missing = [forced_prompts[row // rows_per_prompt] and not done for row, done in enumerate(complete)]
        if any(missing):
            rows = [row for row, flag in enumerate(missing) if flag]
            logger.warning(f"force_image_after was not met in row(s) {rows}: generation stopped (EOS, a stop string "
                           f"or a stopping criterion) before the image; see GILLGenerateOutput.missing_forced_images")
        return missing

    # ---- [IMG] states ----
    def _image_slots(self, sequences: torch.Tensor, prompt: dict, prefix, rows_per_prompt: int
                     ) -> list[list[GeneratedImageSlot]]:
        """One forward over the final ``(R, T + n)`` sequences -> the states of every complete [IMG] block."""
        r, width = self.config.num_img_tokens, prompt["ids_width"]
        new = sequences[:, width:]
        img = torch.tensor(self.config.img_token_ids, device=new.device)
        windows = new.unfold(1, r, 1) if new.shape[1] >= r else new.new_zeros(new.shape[0], 0, r)
        starts = (windows == img).all(-1).nonzero().tolist()  # [(row, position of [IMG0])]
        slots = [[] for _ in range(sequences.shape[0])]
        if not starts:
            return slots
        embeds, mask = self._full_sequence_inputs(sequences, prompt, prefix, rows_per_prompt)
        rows = sorted({row for row, _ in starts})  # only the rows that hold an image run again
        embeds, mask = embeds[rows], mask[rows]
        offset = embeds.shape[1] - new.shape[1]  # LLM position of the first new token
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.language_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                  output_hidden_states=True, use_cache=False, logits_to_keep=1)
        features = out.hidden_states[self.config.hidden_layer].to(self.adapter.w_t2i.weight.dtype)
        for row, pos in starts:
            at, i = offset + pos, rows.index(row)
            states = features[i, at:at + r]
            voken = states if self.config.voken_feature_position == "at_token" else features[i, at - 1:at + r - 1]
            slots[row].append(GeneratedImageSlot(pos, states.clone(), voken.clone()))
        return slots

    def _full_sequence_inputs(self, sequences, prompt, prefix, rows_per_prompt):
        """``inputs_embeds`` ``(R, T + n, e)`` and attention mask of prompt + answer, rows expanded like generate's."""
        width = prompt["ids_width"]
        mask = prompt["attention_mask"]
        if mask is None:
            mask = torch.ones(prompt["batch"], prompt["length"], dtype=torch.long, device=sequences.device)
        mask = torch.cat([mask.to(sequences.device).repeat_interleave(rows_per_prompt, 0),
                          torch.ones_like(sequences[:, width:])], dim=1)
        if prompt["inputs_embeds"] is not None:
            embeds = torch.cat([prompt["inputs_embeds"].repeat_interleave(rows_per_prompt, 0),
                                self.embed_tokens(sequences)], dim=1)
            return embeds, mask
        embeds = self.embed_tokens(sequences)
        if prefix is not None:
            per_prompt = (prompt["input_ids"] == self.config.image_token_id).sum(1) // self.config.num_visual_tokens
            groups = prefix.split(per_prompt.tolist())
            rows = torch.cat([groups[b // rows_per_prompt] for b in range(sequences.shape[0])])
            embeds = self.merge_visual_prefix(embeds, sequences, rows)
        return embeds, mask

    def _answer_parts(self, new_tokens: torch.Tensor, slots: list) -> list | None:
        """Each row's new ids -> text strings and :class:`GeneratedImageSlot` in reading order (None: no tokenizer)."""
        if self.processor is None:
            return None
        decode = self.processor.tokenizer.decode
        parts, r = [], self.config.num_img_tokens
        for tokens, row_slots in zip(new_tokens.tolist(), slots):
            row, start = [], 0
            for slot in row_slots:
                row += [decode(tokens[start:slot.position], skip_special_tokens=True), slot]
                start = slot.position + r
            row.append(decode(tokens[start:], skip_special_tokens=True))
            parts.append([p for p in row if not isinstance(p, str) or p])
        return parts
