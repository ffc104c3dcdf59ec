"""GILLConfig: backbone pointers, adapter sizes, loss weights and the MiniGPT-5 switches.

Defaults reproduce the released GILL model (OPT-6.7B, CLIP ViT-L/14, SD-1.5, k=4, r=8, p=256, 77x768 mapper
output). Every field is validated in ``validate_gill``, which ``@strict`` runs on construction.
"""

from typing import Literal

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, PreTrainedConfig
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

DEFAULT_LLM = "facebook/opt-6.7b"
DEFAULT_VISION = "openai/clip-vit-large-patch14"
DEFAULT_DIFFUSION = "stable-diffusion-v1-5/stable-diffusion-v1-5"

MAPPER_TYPES = ("gill_mapper", "linear", "mlp", "transformer_encoder")
GEN_LOSS_TYPES = ("l2", "mse")
VOKEN_POSITIONS = ("at_token", "predicting")
MAPPER_INPUT_PROJ = ("linear", "mlp")
TRAINING_STAGES = ("align", "interleaved")
VISUAL_ENCODERS = ("clip_pooled", "clip_patches", "siglip_patches", "blip2_qformer")
VISUAL_PROJECTIONS = ("linear", "mlp")
# vision_config.model_type each visual encoder needs (qformer_config: blip_2_qformer, for blip2_qformer only)
VISION_MODEL_TYPES = {"clip_pooled": "clip_vision_model", "clip_patches": "clip_vision_model",
                      "siglip_patches": "siglip_vision_model", "blip2_qformer": "blip_2_vision_model"}
# The released code's cross-entropy semantics (GILLConfig's defaults deviate from it; see the field comments).
ORIGINAL_SEMANTICS = {"mask_image_token_logit": False, "packed_lp_first_caption_only": True}


def visual_token_count(visual_encoder: str, vision_config, num_query_tokens: int) -> int | None:
    """Visual tokens per image of a sequence encoder (CLIP: CLS + patches, SigLIP: patches, Q-Former: its queries);
    None for "clip_pooled", whose k is free."""
    if visual_encoder == "blip2_qformer":
        return num_query_tokens
    if visual_encoder == "clip_pooled":
        return None
    return (vision_config.image_size // vision_config.patch_size) ** 2 + int(visual_encoder == "clip_patches")


@strict
class GILLConfig(PreTrainedConfig):
    r"""Configuration of a GILL adapter on top of a frozen LLM, a frozen CLIP vision encoder and a frozen diffusion model.

    Sizes follow the paper's notation: ``num_visual_tokens`` = k, ``num_img_tokens`` = r, ``ret_emb_dim`` = p,
    ``num_gen_queries`` = L and ``gen_emb_dim`` = the width of the diffusion model's text encoder.
    ``img_token_ids`` are the tokenizer ids of ``[IMG0]..[IMG{r-1}]`` and ``image_token_id`` the id of the
    ``<|image|>`` placeholder that stands for one visual prefix token; the processor fills both in.
    """

    model_type = "gill"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="opt"),
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="clip_vision_model"),
        "qformer_config": SubConfigSpec(config_class=AutoConfig, model_type="blip_2_qformer", optional=True),
    }

    # Frozen backbones: ids or local paths, and their configs (so shapes are known without loading weights).
    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    text_model_name_or_path: str | None = DEFAULT_LLM
    vision_model_name_or_path: str | None = DEFAULT_VISION
    diffusion_model_name_or_path: str | None = DEFAULT_DIFFUSION

    # Visual input (gill_hf.visual_encoders): which features of the frozen encoder W_cap maps into the LLM.
    # "clip_pooled" (GILL): CLIP's pooled vector -> k vectors; "clip_patches" / "siglip_patches": one LLM vector per
    # visual token of the last layer (CLIP: CLS + patches); "blip2_qformer" (MiniGPT-5): BLIP-2 vision + Q-Former,
    # one vector per query output. vision_config is a CLIP / SigLIP / BLIP-2 vision config accordingly.
    visual_encoder: Literal["clip_pooled", "clip_patches", "siglip_patches", "blip2_qformer"] = "clip_pooled"
    visual_projection: Literal["linear", "mlp"] = "linear"  # W_cap: Linear, or Linear-GELU-Linear (hidden e)
    train_visual_projection: bool = True  # MiniGPT-5: False (a frozen llama_proj); saved in the adapter either way
    qformer_config: dict | PreTrainedConfig | None = None  # Blip2QFormerConfig, for "blip2_qformer" only
    num_query_tokens: int = 32  # the Q-Former's learned queries ("blip2_qformer" only)

    # Tokens.
    num_visual_tokens: int = 4  # k: LLM input vectors per image; fixed by the encoder unless clip_pooled
    num_img_tokens: int = 8  # r: [IMG0..r-1]
    img_token_ids: list[int] | None = None
    image_token_id: int | None = None

    # Heads.
    ret_emb_dim: int = 256  # p
    hidden_layer: int = -1  # which entry of the LLM's hidden_states feeds W_t2i and the mapper
    logit_scale_init: float = 2.6592600369644043  # log(1 / 0.07)

    # Mapper f_omega (paper Sec. 3.2 and Table 3 ablations).
    mapper_type: Literal["gill_mapper", "linear", "mlp", "transformer_encoder"] = "gill_mapper"
    mapper_hidden_dim: int = 512
    mapper_num_heads: int = 4
    mapper_encoder_layers: int = 4
    mapper_decoder_layers: int = 4
    mapper_ffn_dim: int = 2048
    mapper_dropout: float = 0.0
    mapper_input_proj: Literal["linear", "mlp"] = "linear"  # MiniGPT-5: "mlp" (Linear-GELU-Linear)
    mapper_add_input_embeddings: bool = True  # GILL adds the [IMG] input embeddings to their hidden states
    num_gen_queries: int = 77  # L
    gen_emb_dim: int = 768  # diffusion text-encoder width
    diffusion_layout: Literal["stable_diffusion", "sdxl", "sd3", "flux"] = "stable_diffusion"  # target family (diffusion_layouts)
    gen_pooled_dim: int | None = None  # width of the pooled text vector the layout also needs (SDXL), else None
    voken_feature_position: Literal["at_token", "predicting"] = "at_token"  # MiniGPT-5: "predicting" (shift -1)

    # Decision head (retrieve vs generate) on the [IMG0] hidden state (+ max retrieval score, appendix variant).
    decision_use_retrieval_score: bool = False
    decision_dropout: float = 0.5
    decision_threshold: float = 0.5  # P(retrieve) above which the model retrieves

    # Training objective (Eq. 5) and data packing.
    caption_loss_weight: float = 1.0  # l_c
    img_token_loss_weight: float = 1.0  # l_p
    gen_loss_weight: float = 1.0  # l_g
    ret_loss_weight: float = 1.0  # l_r
    gen_loss_type: Literal["l2", "mse"] = "l2"  # "l2": mean per-token L2 distance, as the released code trains
    lp_supervise_caption: bool = True  # the original's l_p also supervises the caption tokens before [IMG0]
    pack_prob: float = 0.5  # probability of packing two examples into one sequence per pass
    # Two deliberate deviations from the released code's cross-entropies; False / True restore the original's
    # (``convert-original --original-semantics`` sets both). Default True: <|image|> only stands for visual input
    # vectors, so it is never a target and never generated (a generated placeholder has no image to fill it), and an
    # LLM without a spare row for it has no logit to keep. The original keeps the LLM's own finite row (an OPT
    # padding row), so its softmaxes run over one token more; from_backbones then resizes an LLM without that row
    # to len(tokenizer), as the original does.
    mask_image_token_logit: bool = True
    # Default False: a packed text row supervises both captions and both [IMG0] in l_p, using all the data. The
    # original's l_p masks everything from the row's first [IMG1], so only the first caption of a packed row counts.
    packed_lp_first_caption_only: bool = False

    # MiniGPT-5 switches (off = GILL).
    training_stage: Literal["align", "interleaved"] = "align"
    use_lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: list[str] | None = None  # None -> ["q_proj", "v_proj"]
    cfg_dropout_prob: float = 0.0  # MiniGPT-5: 0.1
    ldm_loss_weight: float = 0.0  # MiniGPT-5: 1.0 (and caption/l_g weight 0.1, text 0.01)
    ldm_snr_gamma: float | None = None  # MiniGPT-5: 5.0

    def __post_init__(self, **kwargs):
        if self.lora_target_modules is None:
            self.lora_target_modules = ["q_proj", "v_proj"]
        super().__post_init__(**kwargs)

    def validate_gill(self):
        """Raise ``ValueError`` naming the first field whose value cannot work."""
        positive = ("num_visual_tokens", "num_query_tokens", "num_img_tokens", "ret_emb_dim", "mapper_hidden_dim", "mapper_num_heads",
                    "mapper_ffn_dim", "num_gen_queries", "gen_emb_dim", "lora_r", "lora_alpha")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"GILLConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("mapper_encoder_layers", "mapper_decoder_layers"):
            if getattr(self, name) < 0:
                raise ValueError(f"GILLConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("mapper_dropout", "decision_dropout", "decision_threshold", "pack_prob", "cfg_dropout_prob",
                     "lora_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"GILLConfig.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("caption_loss_weight", "img_token_loss_weight", "gen_loss_weight", "ret_loss_weight",
                     "ldm_loss_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"GILLConfig.{name} must be >= 0, got {getattr(self, name)}")
        choices = {"mapper_type": MAPPER_TYPES, "gen_loss_type": GEN_LOSS_TYPES,
                   "voken_feature_position": VOKEN_POSITIONS, "mapper_input_proj": MAPPER_INPUT_PROJ,
                   "training_stage": TRAINING_STAGES, "visual_encoder": VISUAL_ENCODERS,
                   "visual_projection": VISUAL_PROJECTIONS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GILLConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        self._validate_visual_encoder()
        if self.mapper_hidden_dim % self.mapper_num_heads:
            raise ValueError(f"GILLConfig.mapper_hidden_dim ({self.mapper_hidden_dim}) must be divisible by "
                             f"mapper_num_heads ({self.mapper_num_heads})")
        if self.mapper_type == "gill_mapper" and self.mapper_decoder_layers < 1:
            raise ValueError("GILLConfig.mapper_type='gill_mapper' needs mapper_decoder_layers >= 1")
        if self.img_token_ids is not None:
            if len(self.img_token_ids) != self.num_img_tokens:
                raise ValueError(f"GILLConfig.img_token_ids has {len(self.img_token_ids)} ids but num_img_tokens is "
                                 f"{self.num_img_tokens}")
            if len(set(self.img_token_ids)) != len(self.img_token_ids):
                raise ValueError(f"GILLConfig.img_token_ids must be distinct, got {self.img_token_ids}")
            if self.image_token_id is not None and self.image_token_id in self.img_token_ids:
                raise ValueError("GILLConfig.image_token_id must differ from every [IMG] token id")
        pooled = self.diffusion_layout != "stable_diffusion"  # every other family takes a pooled vector
        if pooled != (self.gen_pooled_dim is not None) or (self.gen_pooled_dim or 1) < 1:
            raise ValueError(f"GILLConfig.gen_pooled_dim must be a positive width for diffusion_layout='sdxl', 'sd3' "
                             f"or 'flux' and None otherwise, got {self.gen_pooled_dim} for {self.diffusion_layout!r}")
        if self.ldm_snr_gamma is not None and self.ldm_snr_gamma <= 0:
            raise ValueError(f"GILLConfig.ldm_snr_gamma must be > 0 or None, got {self.ldm_snr_gamma}")
        num_layers = getattr(self.text_config, "num_hidden_layers", None)
        if num_layers is not None and not -(num_layers + 1) <= self.hidden_layer <= num_layers:
            raise ValueError(f"GILLConfig.hidden_layer={self.hidden_layer} is out of range for an LLM with "
                             f"{num_layers} layers (hidden_states has {num_layers + 1} entries)")

    def _validate_visual_encoder(self):
        """vision_config / qformer_config must be the encoder's, and k the number of visual tokens it gives."""
        expected = VISION_MODEL_TYPES[self.visual_encoder]
        got = getattr(self.vision_config, "model_type", None)
        if got != expected:
            raise ValueError(f"GILLConfig.visual_encoder={self.visual_encoder!r} needs a {expected!r} vision_config, "
                             f"got {got!r}")
        qformer = self.qformer_config
        if self.visual_encoder != "blip2_qformer":
            if qformer is not None:
                raise ValueError(f"GILLConfig.qformer_config is for visual_encoder='blip2_qformer' only, got one "
                                 f"with {self.visual_encoder!r}")
        elif getattr(qformer, "model_type", None) != "blip_2_qformer":
            raise ValueError(f"GILLConfig.visual_encoder='blip2_qformer' needs a 'blip_2_qformer' qformer_config, "
                             f"got {getattr(qformer, 'model_type', None)!r}")
        elif qformer.encoder_hidden_size != self.vision_config.hidden_size:
            raise ValueError(f"GILLConfig.qformer_config.encoder_hidden_size ({qformer.encoder_hidden_size}) must "
                             f"equal vision_config.hidden_size ({self.vision_config.hidden_size})")
        tokens = self.encoder_visual_tokens
        if tokens is not None and self.num_visual_tokens != tokens:
            raise ValueError(f"GILLConfig.num_visual_tokens={self.num_visual_tokens}, but visual_encoder="
                             f"{self.visual_encoder!r} gives {tokens} visual tokens per image")

    # ---- derived widths (from the sub-configs; no weights needed) ----
    @property
    def llm_embed_dim(self) -> int:
        """e: width of the LLM's input embeddings (OPT-350m style models project it)."""
        tc = self.text_config
        return getattr(tc, "word_embed_proj_dim", None) or tc.hidden_size

    @property
    def llm_feature_dim(self) -> int:
        """Width of ``hidden_states[hidden_layer]``: the final states (what the LM head sees) for -1."""
        return self.llm_embed_dim if self.hidden_layer in (-1, self.text_config.num_hidden_layers) \
            else self.text_config.hidden_size

    @property
    def llm_output_dim(self) -> int:
        """Width of the vectors the LM head multiplies (the last entry of hidden_states)."""
        return self.llm_embed_dim

    @property
    def tie_img_embeddings(self) -> bool:
        """Tied LLMs score [IMG] tokens with their input rows, as the original; untied ones get own output rows."""
        return bool(getattr(self.text_config, "tie_word_embeddings", False))

    @property
    def encoder_visual_tokens(self) -> int | None:
        """Visual tokens per image a sequence encoder gives (CLIP: CLS + patches, SigLIP: patches, Q-Former: the
        queries); None for "clip_pooled", whose k is free."""
        return visual_token_count(self.visual_encoder, self.vision_config, self.num_query_tokens)

    @property
    def vision_dim(self) -> int:
        """d: width of the encoder's features: W_cap's input and the image vector W_i2t reads (the Q-Former's
        width for "blip2_qformer", the vision tower's otherwise)."""
        return (self.qformer_config if self.visual_encoder == "blip2_qformer" else self.vision_config).hidden_size


# Registered here rather than in gill_hf/__init__.py so that a copy of this module run as a Hub repo's remote code
# (gill_hf not installed) registers too: the AutoConfig / AutoTokenizer calls made while that repo loads then find
# "gill" instead of asking again for trust_remote_code. The first registration (the installed library's) is kept.
if GILLConfig.model_type not in CONFIG_MAPPING:
    AutoConfig.register(GILLConfig.model_type, GILLConfig)


def gill_paper_config(**overrides) -> GILLConfig:
    """The released GILL configuration, built offline: OPT-6.7B and CLIP ViT-L/14 widths, [IMG] ids 50266..50273.

    Only shapes matter here (no weights are loaded); use it to count parameters or to convert the release.
    """
    from transformers import CLIPVisionConfig, OPTConfig

    text_config = OPTConfig(vocab_size=50272, hidden_size=4096, num_hidden_layers=32, ffn_dim=16384,
                            num_attention_heads=32, max_position_embeddings=2048, word_embed_proj_dim=4096,
                            do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2)
    vision_config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768)
    values = dict(text_config=text_config.to_dict(), vision_config=vision_config.to_dict(),
                  img_token_ids=list(range(50266, 50274)), image_token_id=50265)
    values.update(overrides)
    return GILLConfig(**values)
