"""LoRA on the frozen LLM via ``peft`` (MiniGPT-5 stage 2); saved as a peft adapter in ``lora/`` beside ours."""

import os

import safetensors.torch
import torch

from ..loading import peft_on_transformers5
from ..modeling_gill import LORA_SUBFOLDER


def apply_lora(model, r: int | None = None, alpha: int | None = None, dropout: float | None = None,
               target_modules: list[str] | None = None):
    """Wrap ``model.language_model`` in a peft LoRA model (defaults from ``model.config``: r 8, alpha 16, dropout
    0.05, q_proj/v_proj); records ``use_lora`` in the config. Returns the model."""
    from peft import LoraConfig, get_peft_model

    if hasattr(model.language_model, "peft_config"):
        raise ValueError("the language model already carries a peft adapter")
    cfg = model.config
    lora = LoraConfig(r=r or cfg.lora_r, lora_alpha=alpha or cfg.lora_alpha,
                      lora_dropout=cfg.lora_dropout if dropout is None else dropout,
                      target_modules=list(target_modules or cfg.lora_target_modules), bias="none",
                      task_type="CAUSAL_LM")
    with peft_on_transformers5():
        model.language_model = get_peft_model(model.language_model, lora)
    cfg.use_lora, cfg.lora_r, cfg.lora_alpha = True, lora.r, lora.lora_alpha
    cfg.lora_dropout, cfg.lora_target_modules = lora.lora_dropout, sorted(lora.target_modules)
    return model


def load_lora_weights(model, checkpoint_dir: str | os.PathLike) -> bool:
    """Copy the LoRA weights saved in ``checkpoint_dir/lora`` into the live peft model (for resuming); returns
    whether there were any."""
    from peft import set_peft_model_state_dict

    path = os.path.join(os.fspath(checkpoint_dir), LORA_SUBFOLDER, "adapter_model.safetensors")
    if not hasattr(model.language_model, "peft_config") or not os.path.exists(path):
        return False
    result = set_peft_model_state_dict(model.language_model, safetensors.torch.load_file(path))
    lora_missing = [k for k in result.missing_keys if "lora_" in k]
    if lora_missing:
        raise ValueError(f"LoRA checkpoint {path} lacks {len(lora_missing)} keys, e.g. {lora_missing[:3]}")
    return True


def lora_parameters(model) -> dict[str, torch.Tensor]:
    """The trainable LoRA tensors of the language model by name (empty without LoRA)."""
    return {n: p for n, p in model.language_model.named_parameters() if "lora_" in n}
