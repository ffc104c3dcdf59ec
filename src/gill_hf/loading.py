"""The loading switches of ``GILLForConditionalGeneration.from_backbones`` / ``from_pretrained``, checked before any
weights load: ``dtype`` (torch dtype, name or ``"auto"``; ``torch_dtype`` alias), ``attn_implementation`` (one name, or
per backbone ``{"text_config": ..., "vision_config": ...}``), ``device_map``, ``quantization_config`` (the LLM only)
and ``output_loading_info``. Also the frozen-LLM activation checkpointing used by ``activation_checkpointing_enable``,
where a saved model is read from (a local folder's verified snapshot, or a Hub id) and the safetensors header check
that finds truncated or corrupt weight files before anything loads.
"""

import contextlib
import difflib
import json
import os
import warnings

import torch

DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
# attn_implementation dict keys -> backbone ("" is the default for backbones not named, as in transformers)
ATTN_KEYS = {"text_config": "text", "language_model": "text", "vision_config": "vision", "vision_model": "vision",
             "": "default"}
ATTN_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flash_attention_2": "_supports_flash_attn",
                      "flash_attention_3": "_supports_flash_attn", "flex_attention": "_supports_flex_attn"}


def unknown_kwargs_error(function: str, unknown, known) -> TypeError:
    """``TypeError`` naming each unexpected keyword argument and, where one is close, the intended one."""
    parts = []
    for name in sorted(unknown):
        close = difflib.get_close_matches(name, list(known), n=1)
        parts.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return TypeError(f"{function}() got unexpected keyword argument(s) {', '.join(parts)}")


def resolve_dtype(dtype=None, torch_dtype=None):
    """``dtype`` / its alias ``torch_dtype`` -> a floating ``torch.dtype``, ``"auto"`` or None."""
    if torch_dtype is not None:
        if dtype is not None and resolve_dtype(dtype) != resolve_dtype(torch_dtype):
            raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree; torch_dtype is the old "
                             "name of dtype, pass only one")
        dtype = torch_dtype
    if dtype is None or dtype == "auto":
        return dtype
    if isinstance(dtype, str):
        name = DTYPE_ALIASES.get(dtype.lower().removeprefix("torch."), dtype.lower().removeprefix("torch."))
        dtype = getattr(torch, name, None) if name in ("float32", "float16", "bfloat16", "float64") else None
        if dtype is None:
            raise ValueError(f"dtype {name!r} is not a floating dtype; use a torch dtype, 'float32', 'float16', "
                             "'bfloat16' or 'auto'")
    if not isinstance(dtype, torch.dtype) or dtype not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating torch dtype, its name or 'auto', got {dtype!r}")
    return dtype


def split_attn_implementation(value) -> dict[str, str | None]:
    """One implementation for both backbones, or a dict keyed by ``text_config`` / ``vision_config`` (or
    ``language_model`` / ``vision_model``; ``""`` = the rest) -> ``{"text": ..., "vision": ...}``."""
    if value is None or isinstance(value, str):
        return {"text": value, "vision": value}
    if not isinstance(value, dict):
        raise TypeError(f"attn_implementation must be a string or a dict per backbone, got {type(value).__name__}")
    unknown = set(value) - set(ATTN_KEYS)
    if unknown:
        raise ValueError(f"attn_implementation keys {sorted(unknown)} name no GILL backbone; use "
                         f"{sorted(k for k in ATTN_KEYS if k)} (or '' for the rest)")
    out = {"text": None, "vision": None}
    for key, impl in value.items():
        targets = ("text", "vision") if ATTN_KEYS[key] == "default" else (ATTN_KEYS[key],)
        for target in targets:
            if ATTN_KEYS[key] != "default" or out[target] is None:
                out[target] = impl
    return out


def check_attn_implementation(model_class, impl: str | None, backbone: str) -> None:
    """Raise a clear error, before loading, when ``model_class`` cannot run attention ``impl``."""
    if impl is None or impl == "eager" or "/" in impl:  # hub kernels are resolved by transformers itself
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.utils import is_flash_attn_2_available, is_flash_attn_3_available, is_torch_flex_attn_available

    name = impl.removeprefix("paged|")
    known = {"eager", *ATTN_SUPPORT_FLAGS, *ALL_ATTENTION_FUNCTIONS.valid_keys()}
    if name not in known:
        close = difflib.get_close_matches(name, sorted(known), n=1)
        raise ValueError(f"attn_implementation={impl!r} (for the {backbone}) is not an attention implementation"
                         + (f"; did you mean {close[0]!r}?" if close else f"; choose from {sorted(known)}"))
    flag = ATTN_SUPPORT_FLAGS.get(name)
    if flag is not None and not getattr(model_class, flag, False):
        raise ValueError(f"the {backbone} ({model_class.__name__}) does not support attn_implementation={impl!r}")
    available = {"flash_attention_2": is_flash_attn_2_available, "flash_attention_3": is_flash_attn_3_available,
                 "flex_attention": is_torch_flex_attn_available}.get(name)
    if available is not None and not available():
        raise ValueError(f"attn_implementation={impl!r} (for the {backbone}) needs a package or torch build this "
                         "machine lacks (flash-attn for flash_attention_*, torch>=2.5 for flex_attention)")


def normalize_quantization_config(quantization_config):
    """A transformers quantization config (or its dict) -> the config object; None passes through."""
    if quantization_config is None or not isinstance(quantization_config, dict):
        return quantization_config
    from transformers.quantizers.auto import AutoQuantizationConfig

    return AutoQuantizationConfig.from_dict(quantization_config)


def check_quantization(quantization_config, dtype) -> None:
    """Reject quantization settings that cannot work, before any weights load."""
    if quantization_config is None:
        return
    method = getattr(quantization_config, "quant_method", "")
    method = str(getattr(method, "value", method)).lower()  # QuantizationMethod enum -> "bitsandbytes", "torchao"
    if dtype == torch.float64:
        raise ValueError("quantization_config with dtype float64: quantized kernels compute in float32/16 or bf16")
    if "bitsandbytes" in method:
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("quantization_config is a BitsAndBytesConfig but bitsandbytes is not installed "
                             "(pip install bitsandbytes; 4-bit / 8-bit loading needs a CUDA GPU)")
        compute = getattr(quantization_config, "bnb_4bit_compute_dtype", None)
        if getattr(quantization_config, "load_in_4bit", False) and isinstance(dtype, torch.dtype) and \
                compute is not None and compute != torch.float32 and compute != dtype:
            raise ValueError(f"bnb_4bit_compute_dtype={compute} disagrees with dtype={dtype}: the non-quantized "
                             "layers would run in one dtype and the 4-bit matmuls in the other; make them equal")
    if "torchao" in method:
        quant_type = getattr(quantization_config, "quant_type", None)
        if type(quant_type).__name__.startswith("Int4WeightOnly") and dtype != torch.bfloat16:
            raise ValueError(f"torchao {type(quant_type).__name__} runs in bfloat16 only; pass dtype=torch.bfloat16 "
                             f"(got {dtype!r}) or use Int8WeightOnlyConfig")


@contextlib.contextmanager
def peft_on_transformers5():
    """peft 0.21 reads the LLM's ``is_gradient_checkpointing``, which transformers 5 deprecates with a FutureWarning
    on every ``get_peft_model`` / ``PeftModel.from_pretrained``; that one warning (about peft, not the caller) is
    silenced here, nothing else."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def resolve_backbone_classes(config):
    """The classes ``from_pretrained`` will instantiate for the LLM and the vision encoder."""
    from transformers import AutoModelForCausalLM

    from .visual_encoders import vision_model_class

    text_config = config.text_config
    mapping = AutoModelForCausalLM._model_mapping
    llm_class = mapping[type(text_config)] if type(text_config) in mapping else None
    return llm_class, vision_model_class(config)


def load_backbones(config, dtype=None, device_map=None, attn_implementation=None, quantization_config=None,
                   output_loading_info: bool = False):
    """Check every switch, then load the frozen LLM and vision encoder (vision on the LLM's first device).

    Returns ``(llm, vision, loading_info)``; ``loading_info`` holds the backbones' own load reports with their keys
    prefixed ``language_model.`` / ``vision_model.`` (None unless ``output_loading_info``)."""
    from transformers import AutoModelForCausalLM

    for name in ("text_model_name_or_path", "vision_model_name_or_path"):
        if not getattr(config, name):
            raise ValueError(f"GILLConfig.{name} is empty: the frozen backbone cannot be loaded")
    dtype = resolve_dtype(dtype)
    attn = split_attn_implementation(attn_implementation)
    quantization_config = normalize_quantization_config(quantization_config)
    check_quantization(quantization_config, dtype)
    llm_class, vision_class = resolve_backbone_classes(config)
    if llm_class is not None:
        check_attn_implementation(llm_class, attn["text"], "language model")
    check_attn_implementation(vision_class, attn["vision"], "vision encoder")

    llm_kwargs = {"dtype": dtype, "device_map": device_map, "output_loading_info": output_loading_info}
    if attn["text"] is not None:
        llm_kwargs["attn_implementation"] = attn["text"]
    if quantization_config is not None:
        llm_kwargs["quantization_config"] = quantization_config
    llm = AutoModelForCausalLM.from_pretrained(config.text_model_name_or_path, **llm_kwargs)
    vision_kwargs = {"dtype": dtype, "output_loading_info": output_loading_info}
    if attn["vision"] is not None:
        vision_kwargs["attn_implementation"] = attn["vision"]
    vision = vision_class.from_pretrained(config.vision_model_name_or_path, **vision_kwargs)
    info = None
    if output_loading_info:
        (llm, llm_info), (vision, vision_info) = llm, vision
        info = {key: [f"language_model.{k}" for k in llm_info.get(key, [])] +
                [f"vision_model.{k}" for k in vision_info.get(key, [])]
                for key in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        info["error_msgs"] = list(llm_info.get("error_msgs", [])) + list(vision_info.get("error_msgs", []))
    return llm, vision.to(llm.get_input_embeddings().weight.device), info


# ---------------------------------------------------------------------------------------------- saved folders
def check_model_location(path: str) -> None:
    """Accept a local folder or something that can be a Hub repo id; else an error naming ``path``."""
    if os.path.isdir(path):
        return
    if os.path.exists(path):
        raise NotADirectoryError(f"{path} is a file; from_pretrained takes the folder a GILL model was saved to, or "
                                 "a Hub repo id")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(path)
    except HFValidationError:
        raise FileNotFoundError(f"no such folder {path!r} (and it is not a Hub repo id 'owner/name' either)") from None


@contextlib.contextmanager
def open_saved_model(path: str):
    """Yield where to read one save from: a local folder's verified snapshot (``gill_hf.atomic``; the folder itself
    when it has no manifest), or the Hub id unchanged. Raises for a path that is neither (see
    :func:`check_model_location`)."""
    from .atomic import verified_snapshot

    check_model_location(path)
    if not os.path.isdir(path):
        yield path
        return
    with verified_snapshot(path) as root:
        yield root


def read_safetensors_header(path: str, shown: str | None = None) -> dict[str, dict]:
    """``{tensor name: {"dtype", "shape", "data_offsets"}}`` from a safetensors file's header, without loading it.

    Raises ``OSError`` naming ``shown`` (default ``path``) when the file is shorter or longer than its header says
    (truncated by an interrupted copy, download or write) or the header is unreadable."""
    shown = shown or path
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = int.from_bytes(head, "little") if len(head) == 8 else None
        if length is None or length > size - 8:
            raise OSError(f"{shown} is truncated or not a safetensors file: {size} bytes, too few for its header "
                          "(an interrupted copy, download or write?)")
        try:
            header = json.loads(handle.read(length))
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
        except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
            raise OSError(f"{shown} has a corrupt safetensors header ({type(err).__name__}: {err})") from None
    if 8 + length + end != size:
        state = "truncated" if 8 + length + end > size else "longer than its header describes"
        raise OSError(f"{shown} is {state}: {size} bytes, its header describes {8 + length + end} (an interrupted "
                      "copy, download or write?)")
    return tensors
