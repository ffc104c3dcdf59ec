"""Convert the original GILL release (kohjingyu/gill) into a gill_hf model folder.

Inputs are the release files: ``pretrained_ckpt.pth.tar`` (137 trainable tensors, bf16, saved from CUDA),
``model_args.json``, optionally ``decision_model.pth.tar`` and a ``cc3m_embeddings*.npy`` pickle. Tensors are read
with ``torch.load(weights_only=True, map_location="cpu")`` and the pickle with the restricted unpickler, so nothing
in the files can run code. Every released key and shape is checked before anything is written; dtypes are kept.

The output folder holds ``config.json`` and ``model.safetensors`` (exactly ``adapter_state_dict()``'s keys), plus
``retrieval_index/`` when embeddings are given; ``GILLForConditionalGeneration.from_pretrained(out_dir)`` loads it
with the backbones named in the config. Processor files need the backbones' tokenizer and image processor, which
are not in the release: ``with_processor=True`` (``--with-processor``) fetches them by the ids in model_args.json
(Hub or local paths) and saves a GILLProcessor. Offline, convert without it and save the processor into the folder
later.

Token ids: as the original's ``load_gill``, the ``<|image|>`` / ``[IMG0..r-1]`` ids are recomputed from the LLM's
tokenizer (the tokens added when missing, ``<|image|>`` first: 50265 and 50266..50273 for OPT), not read from
model_args.json; where the two disagree the tokenizer wins and a warning names both (the release's 8 [IMG] rows are
positional: ``load_gill`` copies them into the last rows of the resized table, whatever model_args.json says). When
the tokenizer cannot be loaded (offline) the ids of model_args.json are kept, with a warning; every later load
checks them against the LLM's vocabulary and any paired processor (``gill_hf.token_ids``).

``original_semantics=True`` (``--original-semantics``) writes a config whose losses and log-likelihoods are the
original's (``mask_image_token_logit=False``, ``packed_lp_first_caption_only=True``, and an LLM vocabulary covering
``<|image|>`` as the original's ``resize_token_embeddings(len(tokenizer))``); the default keeps gill_hf's choices.
``index_dtype`` (``--index-dtype``) stores the retrieval index in float16 (default) or float32.

Inference then follows the original: the [IMG] hidden states are the LLM's last ``hidden_states`` (what its tied LM
head sees), the mapper adds the [IMG] input embeddings to them, retrieval scores are ``exp(logit_scale)`` times
cosines, and the decision head's argmax (threshold 0.5) picks retrieval or generation. Load with
``dtype=torch.bfloat16`` to also run in the release's precision (the default fp32 holds the same bf16 values).
"""

import json
import os
import pickle
import shutil
import tempfile
from collections import Counter

import safetensors.torch
import torch
from transformers import AutoConfig, CLIPVisionConfig
from transformers.utils import logging

from .configuration_gill import DEFAULT_LLM, DEFAULT_VISION, ORIGINAL_SEMANTICS, GILLConfig, gill_paper_config
from .decision import load_decision_state_dict
from .modeling_gill import ADAPTER_WEIGHTS_NAME, GILLAdapter
from .retrieval import RetrievalIndex
from .token_ids import add_gill_tokens, check_processor, check_token_ids

logger = logging.get_logger(__name__)

# Released key -> ours. Entries ending in "." rename a prefix; the others a whole key.
KEY_MAP = (
    ("model.input_embeddings.weight", "adapter.img_embeddings"),  # the 8 [IMG] rows of the tied OPT embedding
    ("model.logit_scale", "adapter.logit_scale"),
    ("model.visual_embeddings.", "adapter.w_cap."),
    ("model.visual_fc.", "adapter.w_i2t."),
    ("model.ret_text_hidden_fcs.0.model.", "adapter.w_t2i."),
    ("model.gen_text_hidden_fcs.0.fc.", "adapter.mapper.in_proj."),
    ("model.gen_text_hidden_fcs.0.query_embs", "adapter.mapper.queries"),
    ("model.gen_text_hidden_fcs.0.model.", "adapter.mapper.out_proj."),
    ("model.gen_text_hidden_fcs.0.tfm.", "adapter.mapper.transformer."),  # same nn.Transformer layout
)
DECISION_KEYS = {"1.weight": "adapter.decision_head.1.weight", "1.bias": "adapter.decision_head.1.bias"}
RETRIEVAL_INDEX_DIR = "retrieval_index"
RELEASE_FILES = {"checkpoint": "pretrained_ckpt.pth.tar", "model_args": "model_args.json",
                 "decision": "decision_model.pth.tar", "embeddings": "cc3m_embeddings_urls.npy"}  # as released

# model_args.json: fields copied into GILLConfig, values the converter requires, and fields unused at inference.
MODEL_ARGS_TO_CONFIG = {"opt_version": "text_model_name_or_path", "visual_encoder": "vision_model_name_or_path",
                        "n_visual_tokens": "num_visual_tokens", "ret_emb_dim": "ret_emb_dim",
                        "gen_emb_dim": "gen_emb_dim", "num_tokens": "num_img_tokens",
                        "num_clip_tokens": "num_gen_queries"}
MODEL_ARGS_REQUIRED = {"text_fc_mode": "gill_mapper", "ret_text_fc_mode": "linear", "share_ret_gen": True}
MODEL_ARGS_IGNORED = {"freeze_lm", "freeze_vm", "norm_image_embed", "task"}
MODEL_ARGS_TOKENS = ("text_emb_layers", "retrieval_token_idx", "gen_token_idx")
INDEX_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _rename(key: str, table) -> str | None:
    for source, target in table:
        if key == source or (source.endswith(".") and key.startswith(source)):
            return target + key[len(source):]
    return None


def to_gill_key(original_key: str) -> str | None:
    """Released key -> gill_hf key (None when the release layout has no such key)."""
    return _rename(original_key, KEY_MAP)


def to_original_key(gill_key: str) -> str | None:
    """gill_hf key -> released key (None for tensors the release does not hold, e.g. the decision head)."""
    return _rename(gill_key, [(ours, theirs) for theirs, ours in KEY_MAP])


# ---------------------------------------------------------------------------------------------- config
def config_from_model_args(model_args: dict) -> GILLConfig:
    """The released ``model_args.json`` -> GILLConfig; settings this library cannot reproduce raise ``ValueError``.

    For the released backbones (facebook/opt-6.7b, openai/clip-vit-large-patch14) the widths come from
    :func:`gill_paper_config` offline; other backbones are read with ``AutoConfig`` (a local path or the Hub).
    """
    known = set(MODEL_ARGS_TO_CONFIG) | set(MODEL_ARGS_REQUIRED) | MODEL_ARGS_IGNORED | set(MODEL_ARGS_TOKENS)
    unknown = sorted(set(model_args) - known)
    missing = sorted((set(MODEL_ARGS_TO_CONFIG) | set(MODEL_ARGS_REQUIRED) | set(MODEL_ARGS_TOKENS))
                     - set(model_args))
    if unknown or missing:
        raise ValueError(f"model_args does not look like a GILL release: unknown fields {unknown}, missing {missing}")
    for name, required in MODEL_ARGS_REQUIRED.items():
        if model_args[name] != required:
            raise ValueError(f"model_args.{name}={model_args[name]!r} is not supported; the converter needs "
                             f"{required!r} (the released GILL layout)")
    layers = model_args["text_emb_layers"]
    if not (isinstance(layers, list) and len(layers) == 1 and isinstance(layers[0], int)):
        raise ValueError(f"model_args.text_emb_layers={layers!r}: only one LLM layer is supported")
    img_ids = model_args["gen_token_idx"]
    if model_args["retrieval_token_idx"] != img_ids:
        raise ValueError("model_args.retrieval_token_idx and gen_token_idx differ; GILL shares one [IMG] block")
    values = {ours: model_args[theirs] for theirs, ours in MODEL_ARGS_TO_CONFIG.items()}
    # The release's tokenizer adds <|image|> right before [IMG0..r-1].
    values.update(hidden_layer=layers[0], img_token_ids=list(img_ids), image_token_id=img_ids[0] - 1)
    if (values["text_model_name_or_path"], values["vision_model_name_or_path"]) == (DEFAULT_LLM, DEFAULT_VISION):
        return gill_paper_config(**values)
    try:
        text_config = AutoConfig.from_pretrained(values["text_model_name_or_path"]).to_dict()
        vision_config = CLIPVisionConfig.from_pretrained(values["vision_model_name_or_path"]).to_dict()
    except OSError as err:
        raise ValueError(f"cannot read the backbone configs of {values['text_model_name_or_path']!r} / "
                         f"{values['vision_model_name_or_path']!r}: {err}") from err
    return GILLConfig(text_config=text_config, vision_config=vision_config, **values)


def load_release_tokenizer(config: GILLConfig, tokenizer=None, required: bool = False):
    """The LLM's tokenizer with the GILL tokens added: ``tokenizer`` (an object, a path or a Hub id; default the
    config's LLM). None when it cannot be loaded and not ``required`` (logged)."""
    if tokenizer is None or isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        name = os.fspath(tokenizer) if tokenizer is not None else config.text_model_name_or_path
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:
            if required:
                raise ValueError(f"cannot load the tokenizer {name!r}: {err}") from err
            logger.warning(f"cannot load the tokenizer {name!r} ({err}); the [IMG] / <|image|> ids are taken "
                           "unchecked from model_args.json and checked when a processor is paired with the model")
            return None
    add_gill_tokens(tokenizer, config.num_img_tokens)
    return tokenizer


def with_tokenizer_ids(config: GILLConfig, tokenizer, source: str = "model_args.json") -> GILLConfig:
    """``config`` with the GILL token ids recomputed from ``tokenizer`` as ``load_gill`` does; a warning names
    both when ``source``'s ids differ (the tokenizer's are what the original runs with)."""
    image_id, img_ids = add_gill_tokens(tokenizer, config.num_img_tokens)
    if (image_id, img_ids) != (config.image_token_id, list(config.img_token_ids)):
        logger.warning(f"{source} gives [IMG] ids {list(config.img_token_ids)} (<|image|> {config.image_token_id}) "
                       f"but the tokenizer gives {img_ids} (<|image|> {image_id}); using the tokenizer's, as the "
                       "original's load_gill does")
    values = config.to_dict()
    values.update(img_token_ids=img_ids, image_token_id=image_id)
    return GILLConfig(**values)


def with_original_semantics(config: GILLConfig, tokenizer=None) -> GILLConfig:
    """``config`` whose cross-entropies are the original's (:data:`ORIGINAL_SEMANTICS`); the LLM vocabulary grows
    to ``len(tokenizer)`` when it has no row for ``<|image|>``, as the original resizes the LLM."""
    values = {**config.to_dict(), **ORIGINAL_SEMANTICS}
    text_config = config.text_config.to_dict()
    if config.image_token_id >= text_config["vocab_size"]:
        if tokenizer is None:
            raise ValueError(f"original semantics score <|image|> (id {config.image_token_id}) with the LLM's own row "
                             f"but the LLM has {text_config['vocab_size']} rows, and without its tokenizer the "
                             "resized vocabulary is unknown: pass the tokenizer")
        text_config["vocab_size"] = len(tokenizer)
    values["text_config"] = text_config
    return GILLConfig(**values)


def index_dtype_of(name: str | torch.dtype | None) -> torch.dtype:
    """``"float16"`` / ``"float32"`` (or the torch dtype; None = float16) -> the retrieval index storage dtype."""
    if name is None:
        return torch.float16
    if isinstance(name, torch.dtype) and name in INDEX_DTYPES.values():
        return name
    if name not in INDEX_DTYPES:
        raise ValueError(f"index_dtype must be one of {sorted(INDEX_DTYPES)}, got {name!r}")
    return INDEX_DTYPES[name]


# ---------------------------------------------------------------------------------------------- weights
def release_key_shapes(config: GILLConfig) -> dict[str, tuple[int, ...]]:
    """Every key the release holds for ``config`` and its shape, from the adapter built on the meta device."""
    with torch.device("meta"):
        adapter = GILLAdapter(config)
    shapes = {}
    for key, value in adapter.state_dict().items():
        if key.startswith("decision_head."):
            continue
        original = to_original_key("adapter." + key)
        if original is None:
            raise ValueError(f"adapter tensor {key} has no counterpart in the released checkpoint layout")
        shapes[original] = tuple(value.shape)
    return shapes


def load_release_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """``pretrained_ckpt.pth.tar`` -> its state dict on CPU (a ``module.`` prefix is stripped); never runs code."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(f"{os.fspath(path)} is not a plain tensor checkpoint: {err}") from err
    state = data.get("state_dict", data) if isinstance(data, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{os.fspath(path)} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_release_state_dict(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                             source: str = "checkpoint"):
    """Raise one ``ValueError`` listing every missing key, unexpected key and wrong shape."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = [f"{k}: {tuple(state_dict[k].shape)}, expected {expected[k]}"
             for k in sorted(set(expected) & set(state_dict)) if tuple(state_dict[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        parts = [f"{label} ({len(items)}): {items}" for label, items in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if items]
        raise ValueError(f"{source} is not a GILL release checkpoint for this model_args.json; " + "; ".join(parts))


def always_generate_head(config: GILLConfig) -> dict[str, torch.Tensor]:
    """Decision weights that always choose generation, as the original does without a decision model."""
    width = config.llm_feature_dim + int(config.decision_use_retrieval_score)
    return {DECISION_KEYS["1.weight"]: torch.zeros(2, width), DECISION_KEYS["1.bias"]: torch.tensor([1.0, 0.0])}


def convert_state_dict(state_dict: dict[str, torch.Tensor], config: GILLConfig,
                       decision: dict[str, torch.Tensor] | None = None,
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Checked release tensors (+ the released decision head) -> ``adapter_state_dict()`` keys, dtypes kept."""
    check_release_state_dict(state_dict, release_key_shapes(config), source)
    converted = {to_gill_key(k): v.contiguous() for k, v in state_dict.items()}
    if decision is None:
        converted.update(always_generate_head(config))
    else:
        width = config.llm_feature_dim + int(config.decision_use_retrieval_score)
        if decision["1.weight"].shape[1] != width:
            raise ValueError(f"the decision model reads {decision['1.weight'].shape[1]} features but this config's "
                             f"[IMG0] states are {width} wide")
        converted.update({DECISION_KEYS[k]: v.contiguous() for k, v in decision.items()})
    return converted


# ---------------------------------------------------------------------------------------------- whole release
def processor_for(config: GILLConfig, tokenizer):
    """The GILLProcessor of the config's vision backbone and ``tokenizer``, checked against the config."""
    from transformers import AutoImageProcessor

    from .processing_gill import GILLProcessor

    processor = GILLProcessor(AutoImageProcessor.from_pretrained(config.vision_model_name_or_path, backend="pil"),
                              tokenizer, num_visual_tokens=config.num_visual_tokens,
                              num_img_tokens=config.num_img_tokens)
    check_processor(config, processor, config.text_config.vocab_size)
    return processor


def convert_original_release(checkpoint: str | os.PathLike, model_args: str | os.PathLike,
                             out_dir: str | os.PathLike, decision: str | os.PathLike | None = None,
                             embeddings: str | os.PathLike | None = None, with_processor: bool = False,
                             tokenizer=None, index_dtype: str | torch.dtype | None = None,
                             original_semantics: bool = False) -> dict:
    """Write a gill_hf model folder from the release files; returns a summary (tensors, parameters, dtypes, files).

    Args:
        tokenizer: the LLM's tokenizer (object, path or Hub id) the [IMG] ids are recomputed from; default the
            model_args' ``opt_version``.
        index_dtype: ``"float16"`` (default) or ``"float32"`` storage of the retrieval index; needs ``embeddings``.
        original_semantics: write the original's cross-entropy semantics into the config (module docstring).

    Every input is read and checked before the output appears: files are written to a temporary folder beside
    ``out_dir``, which must not exist yet (or be empty), and moved into place at the end.
    """
    if index_dtype is not None and embeddings is None:
        raise ValueError("index_dtype sets the storage of the retrieval index: it needs embeddings")
    index_dtype = index_dtype_of(index_dtype)
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not an empty folder; choose a new output folder")
    with open(model_args) as handle:
        config = config_from_model_args(json.load(handle))
    tokenizer = load_release_tokenizer(config, tokenizer, required=with_processor)
    if tokenizer is not None:
        config = with_tokenizer_ids(config, tokenizer, source=os.fspath(model_args))
    if original_semantics:
        config = with_original_semantics(config, tokenizer)
    check_token_ids(config, tokenizer, config.text_config.vocab_size)
    release = load_release_checkpoint(checkpoint)
    check_release_state_dict(release, release_key_shapes(config), source=os.fspath(checkpoint))
    head = load_decision_state_dict(decision) if decision is not None else None
    index = None
    if embeddings is not None:
        index = RetrievalIndex.from_original_release(embeddings, logit_scale=float(release["model.logit_scale"]),
                                                     dtype=index_dtype)
        try:
            index.check_width(config.ret_emb_dim, "the model's retrieval width (config.ret_emb_dim)")
        except ValueError as err:
            raise ValueError(f"{os.fspath(embeddings)}: {err}") from None
    processor = processor_for(config, tokenizer) if with_processor else None
    weights = convert_state_dict(release, config, head, source=os.fspath(checkpoint))

    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".gill-convert-", dir=os.path.dirname(out_dir))
    try:
        config.save_pretrained(staging)
        safetensors.torch.save_file(weights, os.path.join(staging, ADAPTER_WEIGHTS_NAME),
                                    metadata={"format": "pt", "converted_from": "kohjingyu/gill"})
        if index is not None:
            index.save(os.path.join(staging, RETRIEVAL_INDEX_DIR))
        if processor is not None:
            processor.save_pretrained(staging)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    dtypes = Counter()
    for tensor in weights.values():
        dtypes[str(tensor.dtype).removeprefix("torch.")] += tensor.numel()
    return {"out_dir": out_dir, "tensors": len(weights), "parameters": sum(t.numel() for t in weights.values()),
            "parameters_by_dtype": dict(dtypes), "decision_head": "released" if head is not None else "always generate",
            "retrieval_candidates": len(index) if index is not None else 0,
            "retrieval_index_dtype": str(index.embeddings.dtype).removeprefix("torch.") if index is not None else None,
            "img_token_ids": list(config.img_token_ids), "image_token_id": config.image_token_id,
            "original_semantics": original_semantics,
            "files": sorted(os.path.relpath(os.path.join(root, f), out_dir)
                            for root, _, files in os.walk(out_dir) for f in files)}
