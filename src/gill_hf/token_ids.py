"""GILL's special-token ids checked against the tokenizer and the LLM's embedding table, on every load path.

A config whose ``img_token_ids`` / ``image_token_id`` are not its tokenizer's embeds the wrong rows, or indexes past
the LLM's table (a bare ``IndexError`` in the first forward); :func:`check_token_ids` turns that into one error
naming both values. ``from_pretrained`` runs it before any weights load, ``model.processor = ...`` (and so
``from_backbones`` and ``GILLPipeline``) when a processor is paired with the model, and ``convert-original`` when
it writes a config.
"""

from .chat_templates import IMAGE_TOKEN
from .processing_gill import img_token_strings


def tokenizer_token_ids(tokenizer, num_img_tokens: int) -> tuple[int | None, list[int | None]]:
    """Ids of ``<|image|>`` and ``[IMG0..r-1]`` in ``tokenizer`` (None for a token it does not have)."""
    vocab = tokenizer.get_vocab()
    return vocab.get(IMAGE_TOKEN), [vocab.get(token) for token in img_token_strings(num_img_tokens)]


def add_gill_tokens(tokenizer, num_img_tokens: int) -> tuple[int, list[int]]:
    """Add the missing GILL tokens as :class:`GILLProcessor` (and the original's ``load_gill``) do, ``<|image|>``
    first, then ``[IMG0..r-1]``; returns their ids."""
    tokens = [IMAGE_TOKEN, *img_token_strings(num_img_tokens)]
    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    return tokenizer_token_ids(tokenizer, num_img_tokens)


def check_token_ids(config, tokenizer=None, num_embeddings: int | None = None, source: str = "the tokenizer"):
    """Raise ``ValueError`` when the config's GILL token ids cannot work with ``tokenizer`` / the LLM.

    Args:
        config: a :class:`GILLConfig` with ``img_token_ids`` and ``image_token_id`` set.
        tokenizer: the tokenizer the model will read; its ``<|image|>`` / ``[IMG]`` ids must be the config's and
            each of its other ids needs a row in the LLM's input embeddings.
        num_embeddings: rows of the LLM's input embedding table. GILL's r + 1 tokens lie inside it or right after
            it; ``mask_image_token_logit=False`` needs a row for ``<|image|>`` (its logit is the LLM's own).
        source: how the tokenizer is named in the error.
    """
    r = config.num_img_tokens
    gill_ids = [*config.img_token_ids, config.image_token_id]
    if tokenizer is not None:
        image_id, img_ids = tokenizer_token_ids(tokenizer, r)
        if img_ids != list(config.img_token_ids):
            raise ValueError(f"GILLConfig.img_token_ids are {list(config.img_token_ids)} but {source} gives "
                             f"[IMG0..{r - 1}] the ids {img_ids} (None: no such token)")
        if image_id != config.image_token_id:
            raise ValueError(f"GILLConfig.image_token_id is {config.image_token_id} but {source} gives "
                             f"{IMAGE_TOKEN} the id {image_id} (None: no such token)")
    if num_embeddings is None:
        return
    if tokenizer is not None:
        special = set(gill_ids)
        top, token = max(((i, t) for t, i in tokenizer.get_vocab().items() if i not in special), default=(-1, None))
        if top >= num_embeddings:
            raise ValueError(f"{source} has token {token!r} with id {top} but the LLM's input embeddings have "
                             f"{num_embeddings} rows: resize them (model.resize_token_embeddings(len(tokenizer)))")
    limit = num_embeddings + len(gill_ids)
    if max(gill_ids) >= limit:
        raise ValueError(f"GILLConfig.img_token_ids / image_token_id reach id {max(gill_ids)} but the LLM's input "
                         f"embeddings have {num_embeddings} rows: GILL's {len(gill_ids)} tokens lie inside the table "
                         f"or right after it (ids < {limit}); these ids belong to another tokenizer")
    if not config.mask_image_token_logit and config.image_token_id >= num_embeddings:
        raise ValueError(f"mask_image_token_logit=False keeps the LLM's own logit for {IMAGE_TOKEN} (id "
                         f"{config.image_token_id}) but the LLM's embeddings have {num_embeddings} rows: resize them "
                         "(model.resize_token_embeddings(len(processor.tokenizer)), as the original does) or keep "
                         "mask_image_token_logit=True")


def check_processor(config, processor, num_embeddings: int | None = None):
    """:func:`check_token_ids` for a processor paired with a model, after checking its k and r are the config's."""
    for name in ("num_visual_tokens", "num_img_tokens"):
        if getattr(processor, name) != getattr(config, name):
            raise ValueError(f"the processor has {name}={getattr(processor, name)} but the model's config "
                             f"{getattr(config, name)}")
    check_token_ids(config, processor.tokenizer, num_embeddings, source="the processor's tokenizer")


def check_pretrained_token_ids(config, path: str, shown: str | None = None, **hub_kwargs):
    """Before any weights load: ``config``'s ids against the saved LLM vocabulary size and, when the folder holds
    a processor, against its tokenizer. ``path`` is read (a verified snapshot); errors name ``shown`` (default
    ``path``)."""
    from transformers import AutoTokenizer
    from transformers.utils import cached_file

    tokenizer = None
    if cached_file(path, "processor_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs):
        tokenizer = AutoTokenizer.from_pretrained(path, **hub_kwargs)
    check_token_ids(config, tokenizer, getattr(config.text_config, "vocab_size", None),
                    source=f"the tokenizer saved in {shown or path}")
