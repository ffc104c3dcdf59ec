"""Activation checkpointing of a frozen LLM that stays in eval mode (transformers' own switch only acts in training
mode, which would also switch on the LLM's dropout): behind ``GILLForConditionalGeneration.activation_checkpointing_enable``.
"""

import functools

import torch
from torch.utils.checkpoint import checkpoint
from transformers.modeling_layers import GradientCheckpointingLayer


def set_frozen_layer_checkpointing(language_model, enable: bool = True, checkpoint_kwargs: dict | None = None,
                                   every_n_layers: int = 1, offload: bool = False) -> int:
    """Checkpoint every ``every_n_layers``-th decoder layer of a frozen LLM that stays in eval mode (transformers'
    own checkpointing only runs in training mode, which would switch on the LLM's dropout); ``enable=False``
    restores the layers. Returns the number of checkpointed layers."""
    layers = [m for m in language_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    kwargs = {"use_reentrant": False, **(checkpoint_kwargs or {})}
    count = 0
    for i, layer in enumerate(layers):
        if "_gill_saved_forward" in layer.__dict__:  # undo an earlier setting first
            saved = layer.__dict__.pop("_gill_saved_forward")
            layer.__dict__.pop("forward", None)
            if saved is not None:
                layer.__dict__["forward"] = saved
        if not enable or i % every_n_layers:
            continue
        layer.__dict__["_gill_saved_forward"] = layer.__dict__.get("forward")
        layer.__dict__["forward"] = functools.partial(_checkpointed_call, layer.forward, kwargs, offload)
        count += 1
    return count


def _checkpointed_call(forward, kwargs, offload, *args, **call_kwargs):
    if not torch.is_grad_enabled():
        return forward(*args, **call_kwargs)
    if call_kwargs.get("use_cache"):
        call_kwargs["use_cache"] = False  # a recompute would append to the cache twice
    if offload:
        with torch.autograd.graph.save_on_cpu(pin_memory=torch.cuda.is_available()):
            return checkpoint(forward, *args, **kwargs, **call_kwargs)
    return checkpoint(forward, *args, **kwargs, **call_kwargs)


def count_checkpointed_layers(language_model) -> int:
    return sum("_gill_saved_forward" in m.__dict__ for m in language_model.modules())
