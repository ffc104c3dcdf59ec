"""The frozen visual encoders GILL can read images with (``GILLConfig.visual_encoder``).

Each encoder turns ``(N, 3, H, W)`` pixels into the features W_cap maps into the LLM and the image vector W_i2t maps
into the retrieval space (both of width d = ``config.vision_dim``):

================  =====================================================  =========================================
encoder           features (W_cap input)                                 retrieval vector (W_i2t input)
================  =====================================================  =========================================
clip_pooled       ``(N, d)`` CLIP pooler_output (post-LayerNorm CLS);    the same vector
                  W_cap maps it to k vectors
clip_patches      ``(N, 1 + P, d)`` CLIP last layer, CLS first then the  CLIP pooler_output (post_layernorm of CLS)
                  P patches (before post_layernorm)
siglip_patches    ``(N, P, d)`` SigLIP last layer (after post_layernorm) SigLIP pooler_output (its attention-pooling
                                                                         head), or the patch mean without a head
blip2_qformer     ``(N, Q, d)`` the Q-Former's outputs for its Q learned  mean of the Q query outputs
                  queries over the BLIP-2 vision tower's states
================  =====================================================  =========================================

The retrieval vector is recomputed from the features (one LayerNorm, SigLIP's pooling head or a mean), so the
features alone are what flows through the model. The BLIP-2 encoder is :class:`Blip2QFormerVisionModel`: BLIP-2's
image side without its language model, loadable from any BLIP-2 checkpoint.
"""

import torch
from torch import nn
from transformers import (Blip2Config, Blip2PreTrainedModel, Blip2QFormerModel, Blip2VisionModel, CLIPVisionConfig,
                          CLIPVisionModel, PreTrainedConfig, SiglipVisionConfig, SiglipVisionModel)
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .configuration_gill import visual_token_count


class Blip2QFormerVisionModel(Blip2PreTrainedModel):
    """BLIP-2's frozen image side: ``vision_model`` (ViT) -> ``qformer`` over ``query_tokens``, no language model.

    Its keys are those of ``Blip2Model`` / ``Blip2ForConditionalGeneration`` (``vision_model.*``, ``query_tokens``,
    ``qformer.*``), so ``from_pretrained`` on a BLIP-2 checkpoint reads only these and skips the language model's
    tensors. ``forward`` returns ``last_hidden_state`` ``(N, Q, D_q)`` (the query outputs, as
    ``Blip2Model.get_qformer_features``) and ``pooler_output`` ``(N, D_q)``, their mean.
    """

    config: Blip2Config
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _keep_in_fp32_modules = ["query_tokens", "qformer"]
    _supports_flash_attn = False  # the Q-Former does not support it
    _keys_to_ignore_on_load_unexpected = [r"^language_model\.", r"^language_projection\."]

    def __init__(self, config: Blip2Config):
        super().__init__(config)
        self.vision_model = Blip2VisionModel._from_config(config.vision_config)
        self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_tokens, config.qformer_config.hidden_size))
        self.qformer = Blip2QFormerModel._from_config(config.qformer_config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> BaseModelOutputWithPooling:
        image_states = self.vision_model(pixel_values=pixel_values).last_hidden_state
        mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
        queries = self.query_tokens.expand(image_states.shape[0], -1, -1)
        states = self.qformer(query_embeds=queries, encoder_hidden_states=image_states,
                              encoder_attention_mask=mask).last_hidden_state
        return BaseModelOutputWithPooling(last_hidden_state=states, pooler_output=states.mean(1))


VISION_MODEL_CLASSES = {"clip_pooled": CLIPVisionModel, "clip_patches": CLIPVisionModel,
                        "siglip_patches": SiglipVisionModel, "blip2_qformer": Blip2QFormerVisionModel}


# model_type of the checkpoints each encoder is read from: a whole model or its vision part
FOLDER_MODEL_TYPES = {"clip_pooled": ("clip", "clip_vision_model"), "clip_patches": ("clip", "clip_vision_model"),
                      "siglip_patches": ("siglip", "siglip_vision_model"), "blip2_qformer": ("blip-2",)}


def vision_model_class(config) -> type:
    """The transformers class of ``config.visual_encoder``'s frozen encoder."""
    return VISION_MODEL_CLASSES[config.visual_encoder]


def encoder_config(config):
    """The config the encoder class is built from: ``vision_config``, or for BLIP-2 a ``Blip2Config`` joining
    ``vision_config``, ``qformer_config`` and ``num_query_tokens`` (its text_config is never used)."""
    if config.visual_encoder != "blip2_qformer":
        return config.vision_config
    return Blip2Config(vision_config=config.vision_config.to_dict(), qformer_config=config.qformer_config.to_dict(),
                       num_query_tokens=config.num_query_tokens)


def build_vision_model(config) -> nn.Module:
    """A randomly initialised encoder for ``config`` (weights come from ``vision_model_name_or_path`` on load)."""
    return vision_model_class(config)(encoder_config(config))


def check_vision_model(config, vision_model: nn.Module):
    """Raise ``ValueError`` unless ``vision_model`` is the encoder ``config`` describes: its class, its feature
    width (d) and its visual tokens per image (k)."""
    expected = vision_model_class(config)
    if type(vision_model) is not expected:
        raise ValueError(f"visual_encoder={config.visual_encoder!r} needs a {expected.__name__}, got "
                         f"{type(vision_model).__name__}")
    blip2 = config.visual_encoder == "blip2_qformer"
    own = vision_model.config
    width = own.qformer_config.hidden_size if blip2 else own.hidden_size
    if width != config.vision_dim:
        raise ValueError(f"vision encoder is {width} wide, config expects {config.vision_dim}")
    tokens = visual_token_count(config.visual_encoder, own.vision_config if blip2 else own, own.num_query_tokens
                                if blip2 else None)
    if tokens not in (None, config.num_visual_tokens):
        raise ValueError(f"vision encoder gives {tokens} visual tokens per image, config expects "
                         f"num_visual_tokens={config.num_visual_tokens}")


def vision_fields_from_pretrained(visual_encoder: str, path: str, **hub_kwargs) -> dict:
    """The GILLConfig vision fields of the encoder saved at ``path`` (a CLIP / SigLIP model or vision-model folder, a
    BLIP-2 checkpoint): ``vision_config`` (+ ``qformer_config``, ``num_query_tokens`` for BLIP-2), and
    ``num_visual_tokens`` for the sequence encoders. A folder of another model type is a ``ValueError``."""
    model_type = PreTrainedConfig.get_config_dict(path, **hub_kwargs)[0].get("model_type")
    if model_type not in FOLDER_MODEL_TYPES[visual_encoder]:
        raise ValueError(f"visual_encoder={visual_encoder!r} reads a {' or '.join(FOLDER_MODEL_TYPES[visual_encoder])} "
                         f"checkpoint, but {path} holds model_type {model_type!r}")
    if visual_encoder == "blip2_qformer":
        blip2 = Blip2Config.from_pretrained(path, **hub_kwargs)
        return {"vision_config": blip2.vision_config.to_dict(), "qformer_config": blip2.qformer_config.to_dict(),
                "num_query_tokens": blip2.num_query_tokens, "num_visual_tokens": blip2.num_query_tokens}
    config_class = SiglipVisionConfig if visual_encoder == "siglip_patches" else CLIPVisionConfig
    vision_config = config_class.from_pretrained(path, **hub_kwargs)
    fields = {"vision_config": vision_config.to_dict()}
    tokens = visual_token_count(visual_encoder, vision_config, 0)
    return fields if tokens is None else {**fields, "num_visual_tokens": tokens}


def image_features(visual_encoder: str, vision_model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(N, 3, H, W)`` -> the features W_cap reads: ``(N, d)`` for clip_pooled, ``(N, n, d)`` otherwise."""
    out = vision_model(pixel_values=pixel_values.to(vision_model.dtype))
    return out.pooler_output if visual_encoder == "clip_pooled" else out.last_hidden_state


def retrieval_vector(visual_encoder: str, vision_model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The features of :func:`image_features` -> ``(N, d)``, the image vector of the retrieval space."""
    if visual_encoder == "clip_pooled":
        return features
    if visual_encoder == "clip_patches":
        layernorm = vision_model.post_layernorm
        return layernorm(features[:, 0].to(layernorm.weight.dtype)).to(features.dtype)
    if visual_encoder == "siglip_patches" and vision_model.config.vision_use_head:
        head = vision_model.head
        return head(features.to(head.probe.dtype)).to(features.dtype)
    return features.mean(1)  # BLIP-2's queries, a SigLIP without a pooling head
