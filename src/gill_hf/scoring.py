"""Scoring with a GILL model: log-likelihoods of texts given an interleaved prompt, and images ranked for a prompt.

* :func:`score_continuations`: log p(candidate | prompt) of one or several candidate texts. The prompt is encoded
  once (one forward with ``use_cache=True``); each batch of candidates reuses its KV cache
  (``Cache.batch_repeat_interleave`` on a copy), so the shared prompt is never recomputed.
* :func:`sequence_log_likelihood`: the original's ``get_log_likelihood_scores``: minus the token-mean cross-entropy
  of every text token of an interleaved prompt (image positions are not scored). With
  ``config.mask_image_token_logit=False`` the value is the original's exactly.
* :func:`rank_images`: the original's re-ranking of generated images: cosine, in GILL's retrieval space, between
  each image (W_i2t CLIP(x)) and the prompt's [IMG0] state (W_t2i h), optionally times exp(logit_scale) to be on
  the scale of :class:`RetrievalIndex` scores (the original scores retrieved images that way).

All three honour the model's logit semantics (``full_logits``) and run without gradients.
"""

import contextlib
import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .modeling_gill import IGNORE_INDEX

REDUCTIONS = ("sum", "mean", "none")
PROMPT_KEYS = ("input_ids", "attention_mask", "pixel_values")


def _processor(model):
    if model.processor is None:
        raise ValueError("the model has no processor attached: attach one (model.processor = GILLProcessor(...)) or "
                         "pass processor output (input_ids, attention_mask, pixel_values)")
    return model.processor


@contextlib.contextmanager
def _eval_mode(model):
    """``model`` in eval mode (no dropout) for the block; its training flag is restored after."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def encode_prompt(model, prompt) -> dict[str, torch.Tensor]:
    """One prompt -> ``{"input_ids": (1, T), "attention_mask": (1, T)[, "pixel_values": (N, 3, H, W)]}`` on the
    model's device. ``prompt``: processor output for one unpadded sequence, or what :class:`GILLProcessor` encodes
    as one sample (a string, or a list of text / image parts)."""
    if not isinstance(prompt, Mapping):
        prompt = _processor(model)(prompt)
    unknown = sorted(set(prompt) - set(PROMPT_KEYS))
    if unknown or "input_ids" not in prompt:
        raise ValueError(f"prompt must hold input_ids (and attention_mask, pixel_values); got keys {sorted(prompt)}")
    ids = torch.as_tensor(prompt["input_ids"])
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"one prompt is scored at a time: input_ids must be (1, T) with T >= 1, got "
                         f"{tuple(ids.shape)}")
    mask = torch.as_tensor(prompt.get("attention_mask", torch.ones_like(ids)))
    if mask.shape != ids.shape or not bool((mask == 1).all()):
        raise ValueError("the prompt must be one unpadded sequence: its attention_mask must be all ones, shaped as "
                         "input_ids")
    out = {"input_ids": ids.to(model.device), "attention_mask": mask.to(model.device)}
    if prompt.get("pixel_values") is not None:
        out["pixel_values"] = torch.as_tensor(prompt["pixel_values"]).to(model.device)
    return out


def tokenize_candidates(model, candidates: Sequence[str]) -> list[list[int]]:
    """Candidate texts -> their token ids, as the processor tokenizes a text part after the first (no BOS,
    special-token strings kept as text)."""
    tokenizer = _processor(model).tokenizer
    if not candidates or not all(isinstance(c, str) for c in candidates):
        raise ValueError("candidates must be a non-empty list of strings")
    ids = tokenizer(list(candidates), add_special_tokens=False, split_special_tokens=True)["input_ids"]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"candidates {empty} tokenize to no tokens; nothing to score")
    return ids


def _candidate_batch(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(b, m)`` ids and their ``(b, m)`` mask."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def score_continuations(model, prompt, candidates: str | Sequence[str], batch_size: int = 8,
                        reduction: str = "sum"):
    """Log-likelihood of each candidate text given ``prompt`` (natural log, the model's own softmax).

    Args:
        prompt: see :func:`encode_prompt` (interleaved text and images; one sample).
        candidates: one text or a list; each is tokenized without BOS and scored token by token after the prompt.
        batch_size: candidates per forward over the shared prompt's KV cache.
        reduction: ``"sum"`` (log p(candidate | prompt)), ``"mean"`` (per token) or ``"none"`` (per-token log-probs).
    Returns:
        ``(C,)`` float32 for ``"sum"`` / ``"mean"`` (a 0-d tensor for one text), or a list of ``(m_c,)`` tensors
        for ``"none"`` (one tensor for one text).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    single = isinstance(candidates, str)
    rows = tokenize_candidates(model, [candidates] if single else list(candidates))
    inputs = encode_prompt(model, prompt)
    prompt_len = inputs["input_ids"].shape[1]
    _processor(model).check_context(prompt_len, max(len(r) for r in rows))
    with _eval_mode(model):
        out = model(**inputs, use_cache=True)
        scores = [_score_batch(model, out, rows[i:i + batch_size], prompt_len)
                  for i in range(0, len(rows), batch_size)]
    token_log_probs = [t for batch in scores for t in batch]
    if reduction == "none":
        return token_log_probs[0] if single else token_log_probs
    reduce = torch.sum if reduction == "sum" else torch.mean
    result = torch.stack([reduce(t) for t in token_log_probs])
    return result[0] if single else result


def _score_batch(model, prompt_out, rows: list[list[int]], prompt_len: int) -> list[torch.Tensor]:
    """Per-token log-probs of ``b`` candidates continuing the prompt whose forward output is ``prompt_out``."""
    pad_id = model.language_model.config.pad_token_id or 0
    ids, mask = _candidate_batch(rows, pad_id, model.device)
    cache = copy.deepcopy(prompt_out.cache)  # the prompt's cache stays intact for the next batch
    cache.batch_repeat_interleave(len(rows))
    attention_mask = torch.cat([mask.new_ones(len(rows), prompt_len), mask], 1)
    out = model(input_ids=ids, attention_mask=attention_mask, cache=cache, use_cache=True)
    first = prompt_out.logits[:, -1:].expand(len(rows), -1, -1)  # the prompt's last position predicts token 0
    logits = torch.cat([first, out.logits[:, :-1]], 1).float()  # (b, m, V')
    log_probs = F.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)  # (b, m)
    return [log_probs[i, :len(row)] for i, row in enumerate(rows)]


@torch.no_grad()
def sequence_log_likelihood(model, prompt) -> torch.Tensor:
    """The original's ``get_log_likelihood_scores``: minus the token-mean next-token cross-entropy over every text
    token of one interleaved prompt (the images' positions are not targets). Returns a 0-d float32 tensor."""
    inputs = encode_prompt(model, prompt)
    ids = inputs["input_ids"]
    labels = ids.masked_fill(ids == model.config.image_token_id, IGNORE_INDEX)
    if int((labels[:, 1:] != IGNORE_INDEX).sum()) == 0:
        raise ValueError("the prompt has no text token after its first position: nothing to score")
    with _eval_mode(model):
        return -model(**inputs, labels=labels).loss


@torch.no_grad()
def rank_images(model, query: str | torch.Tensor, images: Sequence, scale: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank images for a prompt in GILL's retrieval space, as the original ranks its generated images.

    Args:
        query: a text (its [IMG0] state is read from ``"<bos> text [IMG0..r-1]"``) or an ``(f,)`` [IMG0] hidden
            state, e.g. ``generate(...).img0_hidden_states()[i]``.
        images: what the processor's ``preprocess_images`` takes (PIL images, paths...), e.g. generated and
            retrieved images together. They are resized and centre-cropped by the processor; the original squashes
            generated images to 224 x 224 first, which is the same for square images.
        scale: multiply the cosines by ``exp(logit_scale)``, the scale of :class:`RetrievalIndex` scores.
    Returns:
        ``(scores, order)``: ``(M,)`` float32 scores in the order of ``images`` and the ``(M,)`` indices from best to
        worst.
    """
    if len(images) == 0:
        raise ValueError("rank_images needs at least one image")
    pixels = _processor(model).preprocess_images(list(images)).to(model.device)
    with _eval_mode(model):
        state = _img0_state(model, query)
        image_embeds = F.normalize(model.image_retrieval_embeddings(model.encode_images(pixels)).float(), dim=-1)
    text_embed = F.normalize(model.text_retrieval_embeddings(state.to(model.adapter.w_t2i.weight)).float(), dim=-1)
    scores = image_embeds @ text_embed
    if scale:
        scores = scores * model.adapter.logit_scale.float().exp()
    return scores, scores.argsort(descending=True)


def _img0_state(model, query) -> torch.Tensor:
    """``(f,)`` [IMG0] hidden state of a query text, or the given state checked for width."""
    width = model.config.llm_feature_dim
    if isinstance(query, torch.Tensor):
        if tuple(query.shape) != (width,):
            raise ValueError(f"a query state must be ({width},), the width of the [IMG0] hidden states; got "
                             f"{tuple(query.shape)}")
        return query.to(model.device)
    if not isinstance(query, str):
        raise ValueError(f"query must be a text or an ({width},) [IMG0] hidden state, got {type(query).__name__}")
    enc = _processor(model).encode_captions([query], max_length=_processor(model).context_limit or 10_000)
    ids = enc["input_ids"].to(model.device)
    _, features, _ = model.run_language_model(model.embed_tokens(ids), enc["attention_mask"].to(model.device),
                                              use_cache=False)
    rows, cols = model.img_block_positions(ids)
    return features[rows[0, 0], cols[0, 0]]
