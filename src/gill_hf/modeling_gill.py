"""GILLForConditionalGeneration: a frozen causal LLM + frozen CLIP vision encoder joined by trainable GILL adapters.

Shapes use: N examples (images), B sequences, T tokens, k visual tokens, r [IMG] tokens, e LLM embedding width,
f width of the LLM states that feed the heads, d CLIP width, p retrieval width, L x D diffusion conditioning.
"""

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.utils import ModelOutput, cached_file

from .checkpointing import count_checkpointed_layers, set_frozen_layer_checkpointing
from .configuration_gill import GILLConfig
from .generation_gill import GILLGenerationMixin, gill_generation_config
from .losses import contrastive_loss, generation_loss
from .mapper import PooledHead, build_mapper
from .packing import pack_pairs
from .token_ids import check_pretrained_token_ids
from .visual_encoders import (build_vision_model, check_vision_model, image_features, retrieval_vector,
                              vision_fields_from_pretrained)

ADAPTER_PREFIX = "adapter."
ADAPTER_WEIGHTS_NAME = "model.safetensors"
LORA_SUBFOLDER = "lora"  # peft adapter of a LoRA-tuned language model, saved beside the GILL adapter
IGNORE_INDEX = -100


class GILLAdapter(nn.Module):
    """Every trainable GILL tensor (paper Sec. 3); ~50M parameters for OPT-6.7B + CLIP ViT-L + SD-1.5."""

    def __init__(self, config: GILLConfig):
        super().__init__()
        r, p = config.num_img_tokens, config.ret_emb_dim
        e, f, d = config.llm_embed_dim, config.llm_feature_dim, config.vision_dim
        self.w_cap = visual_projection(config)  # image features -> LLM input vectors (Eq. 1)
        self.img_embeddings = nn.Parameter(torch.randn(r, e) * 0.02)  # E_img: [IMG] input rows (Eq. 2)
        if config.tie_img_embeddings:  # tied LLM: the same rows score the [IMG] tokens, as the original
            self.register_parameter("img_output_embeddings", None)
        else:
            self.img_output_embeddings = nn.Parameter(torch.randn(r, config.llm_output_dim) * 0.02)
        self.w_t2i = nn.Linear(f, p)  # [IMG1] state -> retrieval space (Eq. 4)
        self.w_i2t = nn.Linear(d, p)  # pooled image -> retrieval space (Eq. 4)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))  # 1 / tau
        self.mapper = build_mapper(config, f)  # f_omega (Eq. 3)
        self.pooled_head = PooledHead(config) if config.gen_pooled_dim else None  # layouts with a pooled vector
        self.decision_head = nn.Sequential(  # retrieve-vs-generate classifier, label 0 = gen, 1 = ret (Sec. 3.3)
            nn.Dropout(config.decision_dropout), nn.Linear(f + int(config.decision_use_retrieval_score), 2))

    @property
    def img_output_weight(self) -> torch.Tensor:  # (r, e_out)
        return self.img_embeddings if self.img_output_embeddings is None else self.img_output_embeddings


def visual_projection(config: GILLConfig) -> nn.Module:
    """W_cap: ``(..., d)`` -> ``(..., k * e)`` for a pooled vector (k LLM vectors), ``(..., e)`` per visual token of
    a sequence encoder; ``visual_projection="mlp"`` is Linear(d, e) - GELU - Linear(e, out)."""
    d, e = config.vision_dim, config.llm_embed_dim
    out = config.num_visual_tokens * e if config.visual_encoder == "clip_pooled" else e
    if config.visual_projection == "mlp":
        return nn.Sequential(nn.Linear(d, e), nn.GELU(), nn.Linear(e, out))
    return nn.Linear(d, out)


def count_adapter_parameters(config: GILLConfig) -> dict[str, int]:
    """Trainable parameter counts per part, computed on the meta device (no weights are allocated)."""
    with torch.device("meta"):
        adapter = GILLAdapter(config)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in adapter.named_children()}
    counts.update({name: p.numel() for name, p in adapter.named_parameters(recurse=False)})
    counts["total"] = sum(p.numel() for p in adapter.parameters())
    return counts


def expected_adapter_tensors(config: GILLConfig) -> dict[str, tuple[tuple[int, ...], bool]]:
    """``{key as stored on disk: (shape, is floating)}`` of the adapter ``config`` builds (meta device, no weights)."""
    with torch.device("meta"):
        adapter = GILLAdapter(config)
    return {ADAPTER_PREFIX + k: (tuple(v.shape), v.is_floating_point()) for k, v in adapter.state_dict().items()}


def adapter_mismatch_message(own: dict[str, tuple], got: dict[str, tuple], source: str, bad_dtypes=()) -> str | None:
    """One message listing the missing / unexpected keys, wrong shapes (``{key: shape}`` of the model and of the
    checkpoint) and ``bad_dtypes`` of the adapter weights in ``source``; None when they match."""
    wrong = [f"{k}: checkpoint {tuple(got[k])} vs model {tuple(own[k])}" for k in sorted(set(own) & set(got))
             if tuple(got[k]) != tuple(own[k])]
    parts = [f"{label} ({len(items)}): {items}" for label, items in
             (("missing keys", sorted(set(own) - set(got))), ("unexpected keys", sorted(set(got) - set(own))),
              ("wrong shapes", wrong), ("not a float dtype", list(bad_dtypes))) if items]
    return f"adapter weights in {source} do not match this GILL model; " + "; ".join(parts) if parts else None


@dataclass
class GILLCausalLMOutputWithPast(ModelOutput):
    """Inference ``forward`` outputs: ``logits`` ``(B, T, V')`` over the LLM vocabulary + the [IMG] tokens (the
    placeholder scores -inf unless ``config.mask_image_token_logit`` is False), ``cache`` for the next step,
    ``loss`` (next-token CE) when ``labels`` were given; ``image_hidden_states`` ``(N, k, e)``: the visual prefix of
    the prompt's images."""

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: object | None = None
    hidden_states: tuple | None = None
    attentions: tuple | None = None
    image_hidden_states: torch.FloatTensor | None = None


@dataclass
class GILLOutput(ModelOutput):
    """Training outputs (``forward(..., gill_objective=True)``). ``loss`` is the weighted sum of Eq. 5; each term is also returned on its own.

    ``text_embeds`` / ``image_embeds``: ``(N, p)`` retrieval embeddings (unnormalised); ``gen_embeds``: ``(N, L, D)``
    mapper outputs; ``img_hidden_states``: ``(N, r, f)`` LLM states at the [IMG] positions.
    """

    loss: torch.FloatTensor | None = None
    caption_loss: torch.FloatTensor | None = None
    img_token_loss: torch.FloatTensor | None = None
    gen_loss: torch.FloatTensor | None = None
    ret_loss: torch.FloatTensor | None = None
    text_embeds: torch.FloatTensor | None = None
    image_embeds: torch.FloatTensor | None = None
    gen_embeds: torch.FloatTensor | None = None
    img_hidden_states: torch.FloatTensor | None = None


class GILLPreTrainedModel(PreTrainedModel):
    config: GILLConfig
    base_model_prefix = "gill"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _init_weights(self, module):
        """Backbones arrive initialised (or loaded); the adapter initialises itself like the original (torch init)."""


class GILLForConditionalGeneration(GILLPreTrainedModel, GILLGenerationMixin):
    """GILL: frozen ``language_model`` (any causal LM) and ``vision_model`` (``config.visual_encoder``'s: CLIP,
    SigLIP or BLIP-2 vision + Q-Former, see ``gill_hf.visual_encoders``), trainable ``adapter``.

    Build from backbone ids with :meth:`from_backbones`; load a trained adapter with :meth:`from_pretrained`.
    ``save_pretrained`` writes only the adapter (plus config and, if attached, the processor).
    """

    accepts_loss_kwargs = False  # forward returns per-batch means; the Trainer scales for accumulation

    def __init__(self, config: GILLConfig, language_model: PreTrainedModel | None = None,
                 vision_model: nn.Module | None = None):
        super().__init__(config)
        if config.img_token_ids is None or config.image_token_id is None:
            raise ValueError("GILLConfig.img_token_ids / image_token_id are unset: build the model with "
                             "GILLForConditionalGeneration.from_backbones(...), which adds the tokens")
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.vision_model = vision_model or build_vision_model(config)
        for backbone in (self.language_model, self.vision_model):
            backbone.requires_grad_(False)
            backbone.eval()
        self._check_backbone_widths()
        self.adapter = GILLAdapter(config).to(self._backbone_device)
        # The decision head is fit after the rest has converged (paper Sec. 3.3), not by Eq. 5: keep it out of the
        # optimizer (and out of DDP's unused-parameter check) until decision training switches it on.
        self.adapter.decision_head.requires_grad_(False)
        if not config.train_visual_projection:  # MiniGPT-5's frozen llama_proj (still saved with the adapter)
            self.adapter.w_cap.requires_grad_(False)
        self.register_buffer("img_token_ids", torch.tensor(config.img_token_ids), persistent=False)
        self.processor = None  # a GILLProcessor, attached by from_backbones / from_pretrained
        self._frozen_row_norm: dict[str, float] = {}
        # Data-parallel hook (set by gill_hf.training): (n, p) local embeddings -> (N_global, p) for l_r.
        self.contrastive_gather = None
        self.post_init()
        # the children's no-split classes less absent ones (CLIPVisionModel lists CLIPTextEmbeddings): FSDP's
        # transformer wrap policy and device maps look every name up in the model
        self._no_split_modules &= {type(m).__name__ for m in self.modules()}
        self.generation_config = gill_generation_config(config, self.language_model.generation_config)
        self.renormalize_img_embeddings()

    # ------------------------------------------------------------------ construction
    def _check_backbone_widths(self):
        emb = self.language_model.get_input_embeddings().weight
        if emb.shape[1] != self.config.llm_embed_dim:
            raise ValueError(f"LLM input embeddings are {emb.shape[1]} wide but the config expects "
                             f"{self.config.llm_embed_dim}: text_config does not describe this LLM")
        out = self.language_model.get_output_embeddings()
        tied = out is not None and out.weight.data_ptr() == emb.data_ptr()
        if tied != self.config.tie_img_embeddings:
            raise ValueError(f"text_config.tie_word_embeddings={self.config.tie_img_embeddings} but the loaded LLM's "
                             f"output embeddings are {'tied' if tied else 'untied'}")
        check_vision_model(self.config, self.vision_model)
        if self.config.mapper_add_input_embeddings and self.config.llm_feature_dim != self.config.llm_embed_dim:
            raise ValueError(f"mapper_add_input_embeddings needs hidden_layer states ({self.config.llm_feature_dim}) "
                             f"as wide as the input embeddings ({self.config.llm_embed_dim})")

    @property
    def _backbone_device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @property
    def processor(self):
        """The attached :class:`GILLProcessor` (or None); assigning one checks it against the model
        (:meth:`check_processor`)."""
        return self.__dict__.get("_processor")

    @processor.setter
    def processor(self, value):
        if value is not None:
            self.check_processor(value)
        self.__dict__["_processor"] = value

    def check_processor(self, processor):
        """Raise ``ValueError`` unless ``processor``'s k, r and GILL token ids are this model's and every other
        token of its tokenizer has a row in the LLM's input embeddings (``gill_hf.token_ids``)."""
        from .token_ids import check_processor

        check_processor(self.config, processor, self.language_model.get_input_embeddings().weight.shape[0])

    @classmethod
    def from_backbones(cls, text_model: str, vision_model: str, diffusion_model: str | None = None, *,
                       dtype=None, torch_dtype=None, device_map=None, attn_implementation=None,
                       quantization_config=None, output_loading_info: bool = False, **config_kwargs):
        """A fresh (untrained) GILL on backbones given by Hub id or local path; attaches its processor.

        ``gen_emb_dim``, ``gen_pooled_dim``, ``diffusion_layout`` and ``num_gen_queries`` are read from the diffusion model's configs unless given; ``config_kwargs`` are
        :class:`GILLConfig` fields (a name that is none is an error). The loading switches (``dtype`` /
        ``torch_dtype``, ``attn_implementation``, ``device_map``, ``quantization_config``, ``output_loading_info``)
        are those of :meth:`from_pretrained`; the adapter is created in float32. ``vision_model`` is the folder of
        ``visual_encoder``'s model (a CLIP / SigLIP checkpoint, or a BLIP-2 one whose language model is not read);
        for a sequence encoder k (``num_visual_tokens``) is its number of visual tokens.
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        from .loading import unknown_kwargs_error
        from .processing_gill import GILLProcessor

        fields = set(GILLConfig.__dataclass_fields__) - {"text_config", "vision_config", "qformer_config",
                                                          "num_query_tokens", "img_token_ids", "image_token_id"}
        unknown = set(config_kwargs) - fields
        if unknown:
            raise unknown_kwargs_error(f"{cls.__name__}.from_backbones", unknown,
                                       fields | {"dtype", "torch_dtype", "device_map", "attn_implementation",
                                                 "quantization_config", "output_loading_info"})
        if diffusion_model is not None:  # its layout first: an unsupported family fails before anything loads
            from .diffusion_layouts import FAMILIES, layout_of_folder

            layout = layout_of_folder(diffusion_model)
            config_kwargs.setdefault("gen_emb_dim", layout.sequence_dim)
            config_kwargs.setdefault("diffusion_layout", layout.family)
            config_kwargs.setdefault("gen_pooled_dim", layout.pooled_dim)
            config_kwargs.setdefault("num_gen_queries", FAMILIES[layout.family].sequence_length)
        tokenizer = AutoTokenizer.from_pretrained(text_model)
        image_processor = AutoImageProcessor.from_pretrained(vision_model, backend="pil")
        text_config = AutoConfig.from_pretrained(text_model)
        vision_fields = vision_fields_from_pretrained(config_kwargs.get("visual_encoder", "clip_pooled"), vision_model)
        config_kwargs = {**vision_fields, **config_kwargs}  # a k given for a sequence encoder is checked
        processor = GILLProcessor(image_processor, tokenizer,
                                  num_visual_tokens=config_kwargs.get("num_visual_tokens", 4),
                                  num_img_tokens=config_kwargs.get("num_img_tokens", 8),
                                  context_length=getattr(text_config, "max_position_embeddings", None))
        config = GILLConfig(
            text_config=text_config.to_dict(),
            text_model_name_or_path=text_model, vision_model_name_or_path=vision_model,
            diffusion_model_name_or_path=diffusion_model, img_token_ids=processor.img_token_ids,
            image_token_id=processor.image_token_id, **config_kwargs)
        llm, vision, info = cls._load_backbones(
            config, dtype=dtype, torch_dtype=torch_dtype, device_map=device_map,
            attn_implementation=attn_implementation, quantization_config=quantization_config,
            output_loading_info=output_loading_info)
        model = cls(config, llm, vision)
        if not config.mask_image_token_logit and config.image_token_id >= llm.get_input_embeddings().weight.shape[0]:
            model.resize_token_embeddings(len(tokenizer))  # as the original: <|image|> gets the LLM's own row
        model.processor = processor
        return (model, info) if output_loading_info else model

    @staticmethod
    def _load_backbones(config: GILLConfig, dtype=None, device_map=None, torch_dtype=None, attn_implementation=None,
                        quantization_config=None, output_loading_info: bool = False):
        """``(llm, vision, loading_info)``; every switch is checked before any weights load (``gill_hf.loading``)."""
        from .loading import load_backbones, resolve_dtype

        return load_backbones(config, resolve_dtype(dtype, torch_dtype), device_map, attn_implementation,
                              quantization_config, output_loading_info)

    HUB_KWARGS = ("revision", "token", "cache_dir", "local_files_only", "force_download", "proxies")
    # what diffusers passes a pipeline component, and the values that need nothing from GILL (backbones always load
    # through transformers' low-memory path, the adapter is always safetensors)
    DIFFUSERS_COMPONENT_KWARGS = {"max_memory": (None,), "offload_folder": (None,), "use_safetensors": (None, True),
                                  "low_cpu_mem_usage": (None, True)}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, config: GILLConfig | None = None,
                        dtype=None, torch_dtype=None, device_map=None, attn_implementation=None,
                        quantization_config=None, output_loading_info: bool = False, language_model=None,
                        vision_model=None, **hub_kwargs):
        """Load the frozen backbones from the ids in ``config.json``, then the adapter with an exact key check.

        Args:
            dtype: a torch dtype, its name (``"bfloat16"``) or ``"auto"`` (each backbone in its saved dtype, the
                adapter in the dtype it was saved in); ``torch_dtype`` is the old name. A concrete dtype also casts
                the adapter, except under ``quantization_config`` (the adapter then stays float32).
            attn_implementation: ``"eager"``, ``"sdpa"``, ``"flash_attention_2"``... for both backbones, or a dict
                ``{"text_config": ..., "vision_config": ...}`` (``""`` = the rest).
            device_map: for the LLM (``"auto"``, a dict...); the vision encoder follows the LLM's first device.
            quantization_config: a transformers quantization config (``TorchAoConfig``, ``BitsAndBytesConfig``...)
                for the LLM only; CLIP and the adapter stay in full precision.
            output_loading_info: also return ``{"missing_keys", "unexpected_keys", "mismatched_keys",
                "error_msgs"}`` of the backbone loads (keys prefixed ``language_model.`` / ``vision_model.``; the
                adapter load is exact, so it adds none).
            hub_kwargs: ``revision``, ``token``, ``cache_dir``, ``local_files_only``, ``force_download``,
                ``proxies`` for the Hub download; any other keyword is an error naming it.
            language_model / vision_model: backbones already in memory to reuse.

        Incompatible settings (a dtype a quantization method cannot run, an attention implementation a backbone
        lacks) raise before any weights load, and so do damaged files, each named: a truncated or corrupt adapter
        file, adapter keys / shapes / dtypes that do not fit the config, a ``lora/`` folder the config records
        (``use_lora``) but the folder lacks; a missing local folder is a ``FileNotFoundError``. A local folder
        saved with a manifest (``save_pretrained``) is read as exactly one save; files that do not match it (a save
        in progress in another process) are re-read briefly, then :class:`gill_hf.atomic.TornSaveError`.
        """
        from .hub import load_adapter_files
        from .loading import (check_quantization, normalize_quantization_config, open_saved_model, resolve_dtype,
                              unknown_kwargs_error)

        for passed_by_auto in ("_from_auto", "trust_remote_code", "adapter_kwargs"):  # AutoModel* adds these
            hub_kwargs.pop(passed_by_auto, None)
        for name, allowed in cls.DIFFUSERS_COMPONENT_KWARGS.items():  # DiffusionPipeline.from_pretrained adds these
            if name in hub_kwargs and hub_kwargs.pop(name) not in allowed:
                raise ValueError(f"{cls.__name__}.from_pretrained supports {name} only as one of {allowed}")
        unknown = set(hub_kwargs) - set(cls.HUB_KWARGS)
        if unknown:
            raise unknown_kwargs_error(f"{cls.__name__}.from_pretrained", unknown, {
                *cls.HUB_KWARGS, "config", "dtype", "torch_dtype", "device_map", "attn_implementation",
                "quantization_config", "output_loading_info", "language_model", "vision_model"})
        hub_kwargs = {k: v for k, v in hub_kwargs.items() if v is not None}
        dtype = resolve_dtype(dtype, torch_dtype)
        quantization_config = normalize_quantization_config(quantization_config)
        check_quantization(quantization_config, dtype)
        if quantization_config is not None and language_model is not None:
            raise ValueError("quantization_config quantizes the LLM while it loads; it cannot apply to a "
                             "language_model passed in memory (quantize that one yourself)")
        path = os.fspath(pretrained_model_name_or_path)
        with open_saved_model(path) as root:  # a local folder: exactly one save's files (gill_hf.atomic)
            config = config or GILLConfig.from_pretrained(root, **hub_kwargs)
            check_pretrained_token_ids(config, root, path, **hub_kwargs)
            weight_files, source, has_lora = cls._check_saved_files(root, path, config, hub_kwargs)
            info = None
            if language_model is None or vision_model is None:
                llm, vision, info = cls._load_backbones(
                    config, dtype=dtype, device_map=device_map, attn_implementation=attn_implementation,
                    quantization_config=quantization_config, output_loading_info=output_loading_info)
                language_model, vision_model = language_model or llm, vision_model or vision
            model = cls(config, language_model=language_model, vision_model=vision_model)
            model._match_config_vocab()
            adapter_weights = load_adapter_files(weight_files, path)
            model.load_adapter_state_dict(adapter_weights, source)
            model._sync_llm_img_rows()
            if has_lora:  # a LoRA-tuned LLM (MiniGPT-5 stage 2): re-apply the peft adapter
                from peft import PeftModel

                from .loading import peft_on_transformers5

                with peft_on_transformers5():
                    model.language_model = PeftModel.from_pretrained(model.language_model, root,
                                                                     subfolder=LORA_SUBFOLDER, **hub_kwargs)
            if dtype == "auto":  # the adapter in the dtype it was saved in
                saved = [v.dtype for v in adapter_weights.values() if v.is_floating_point()]
                if saved:
                    model.adapter.to(saved[0])
            elif dtype is not None and quantization_config is None:
                model.adapter.to(dtype)
            model._load_saved_extras(root, path, hub_kwargs)
        if info is None and output_loading_info:
            info = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        return (model.eval(), info) if output_loading_info else model.eval()

    @staticmethod
    def _check_saved_files(root: str, path: str, config: GILLConfig, hub_kwargs: dict):
        """Before the backbones load: the adapter files' headers against ``config`` and the LoRA folder the config
        records. Returns ``({name: local file}, the weights' source as errors name it, has LoRA)``."""
        from .hub import adapter_weight_files, check_adapter_files, check_lora_files

        files, listing = adapter_weight_files(root, **hub_kwargs)
        source = os.path.join(path, listing)
        check_adapter_files(files, path, expected_adapter_tensors(config), source)
        return files, source, check_lora_files(root, path, config.use_lora, **hub_kwargs)

    def _load_saved_extras(self, root: str, path: str, hub_kwargs: dict):
        """The saved processor and generation config, when the folder has them; names point at ``path``."""
        self.config._name_or_path = path
        if cached_file(root, "processor_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs):
            from .processing_gill import GILLProcessor

            self.processor = GILLProcessor.from_pretrained(root, **hub_kwargs)
            self.processor.tokenizer.name_or_path = path
        if cached_file(root, "generation_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs):
            from transformers import GenerationConfig

            self.generation_config = gill_generation_config(self.config,
                                                            GenerationConfig.from_pretrained(root, **hub_kwargs))

    # ------------------------------------------------------------------ adapter-only persistence
    def adapter_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trainable entries of ``state_dict`` (default: this model's), keys as stored on disk."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {k: v for k, v in state_dict.items() if k.startswith(ADAPTER_PREFIX)}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict"):
        """Copy adapter weights in; any missing / unexpected key or wrong shape raises one error listing them all."""
        own = self.adapter_state_dict()
        message = adapter_mismatch_message({k: v.shape for k, v in own.items()},
                                           {k: v.shape for k, v in state_dict.items()}, source)
        if message:
            raise ValueError(message)
        with torch.no_grad():
            for key, value in state_dict.items():
                own[key].copy_(value)
        self._frozen_row_norm.clear()

    PUSH_KWARGS = ("repo_id", "token", "commit_message", "commit_description", "private", "create_pr", "revision",
                   "retrieval_index", "datasets", "hyperparameters", "eval_results", "license", "tags", "model_card",
                   "remote_code", "license_name")

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict=None, processor=None,
                        push_to_hub: bool = False, **kwargs):
        """Write config.json, the adapter as ``model.safetensors`` and the processor; never the backbones.

        The save is atomic as a whole (:func:`gill_hf.atomic.atomic_folder`): files are staged inside
        ``save_directory``, moved in, and ``gill_manifest.json`` (their sizes and sha256) is written last, so
        ``from_pretrained`` loads this save or the previous one, never a mix, and a killed save leaves the previous
        one loadable. ``state_dict`` (as the Trainer passes it) is filtered; only the main process writes.
        ``push_to_hub=True`` then uploads through :func:`gill_hf.hub.push_to_hub` (adapter, processor, LoRA and the
        gill_hf model card) to ``repo_id`` (default: the folder's name); ``token``, ``commit_message``,
        ``private``, ``create_pr``, ``revision`` and the card fields go to that push.
        """
        push = {k: kwargs.pop(k) for k in self.PUSH_KWARGS if k in kwargs}
        if push and not push_to_hub:
            raise TypeError(f"save_pretrained got {sorted(push)}, which only apply with push_to_hub=True")
        self._save_local(save_directory, state_dict, processor, **kwargs)
        if push_to_hub and kwargs.get("is_main_process", True):
            from .hub import push_to_hub as push_gill

            repo_id = push.pop("repo_id", None) or os.path.basename(os.path.abspath(os.fspath(save_directory)))
            if "max_shard_size" in kwargs:
                push["max_shard_size"] = kwargs["max_shard_size"]
            return push_gill(self, repo_id, **push)
        return None

    def _save_local(self, save_directory, state_dict=None, processor=None, **kwargs):
        """One atomic save (:func:`gill_hf.atomic.atomic_folder`): config.json (its ``use_lora`` says whether
        ``lora/`` is written), generation config, adapter weights, processor and LoRA adapter, with a manifest."""
        from .atomic import atomic_folder

        if not self.should_save_on_this_rank(kwargs.get("is_main_process", True)):
            return  # as transformers: only the main process writes
        has_lora = hasattr(self.language_model, "peft_config")
        with atomic_folder(save_directory) as staging:
            super().save_pretrained(staging, state_dict=self.adapter_state_dict(state_dict), **kwargs)
            if self.config.use_lora != has_lora:  # the saved config records what the folder holds
                saved = copy.deepcopy(self.config)
                saved.use_lora = has_lora
                saved.save_pretrained(staging)
            processor = processor or self.processor
            if processor is not None:
                processor.save_pretrained(staging)
            if has_lora:  # LoRA on the LLM: a peft adapter beside ours
                self.language_model.save_pretrained(os.path.join(staging, LORA_SUBFOLDER))

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload adapter, config, processor, LoRA adapter and a gill_hf model card in one commit; see
        :func:`gill_hf.hub.push_to_hub` for the options (``revision``, ``retrieval_index``, card fields...)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    # ------------------------------------------------------------------ embeddings (transformers accessors)
    def get_input_embeddings(self) -> nn.Module:
        """The LLM's input embedding table. The [IMG] tokens are embedded from ``adapter.img_embeddings``
        (:meth:`embed_tokens`); where a resized table has rows for them, those rows hold the same values."""
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module):
        self.language_model.set_input_embeddings(value)
        self._frozen_row_norm.clear()
        self._sync_llm_img_rows()

    def get_output_embeddings(self) -> nn.Module | None:
        """The LLM's output projection; the [IMG] logits come from ``adapter.img_output_weight`` (:meth:`full_logits`)."""
        return self.language_model.get_output_embeddings()

    def set_output_embeddings(self, value: nn.Module):
        self.language_model.set_output_embeddings(value)
        self._frozen_row_norm.clear()
        self._sync_llm_img_rows()

    def resize_token_embeddings(self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None,
                                mean_resizing: bool = True) -> nn.Embedding:
        """Resize the frozen LLM's vocabulary (e.g. to ``len(processor.tokenizer)``) and record the size in
        ``config.text_config.vocab_size``, so :meth:`from_pretrained` resizes the reloaded LLM the same way.

        GILL's own tokens keep their meaning: [IMG] inputs and logits still come from the adapter (the resized
        rows are set to E_img / E_out and kept equal after every renormalisation), the image placeholder still
        scores -inf, and the [IMG] renormalisation target is the mean norm of the other rows. Rows of any other new
        token are part of the frozen LLM, which ``save_pretrained`` does not write: they are re-initialised on load.
        """
        embeddings = self.language_model.resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)
        self.config.text_config.vocab_size = embeddings.weight.shape[0]
        self._frozen_row_norm.clear()
        self._sync_llm_img_rows()
        return embeddings

    def _gill_token_ids(self) -> list[int]:
        return [*self.config.img_token_ids, self.config.image_token_id]

    def _match_config_vocab(self):
        """After loading: resize the LLM to ``config.text_config.vocab_size`` when a saved model was resized."""
        size = getattr(self.config.text_config, "vocab_size", None)
        if size and self.language_model.get_input_embeddings().weight.shape[0] != size:
            self.resize_token_embeddings(size, mean_resizing=False)

    @torch.no_grad()
    def _sync_llm_img_rows(self):
        """Copy E_img (and E_out) into the LLM tables' [IMG] rows where a resized vocabulary has such rows."""
        ids = self.img_token_ids
        pairs = [(self.language_model.get_input_embeddings(), self.adapter.img_embeddings)]
        if self.adapter.img_output_embeddings is not None:
            pairs.append((self.language_model.get_output_embeddings(), self.adapter.img_output_embeddings))
        for module, rows in pairs:
            weight = getattr(module, "weight", None)
            if weight is None or type(weight.data) is not torch.Tensor or weight.shape[0] <= int(ids.max()):
                continue  # the [IMG] ids lie beyond this table (GILL pads the logits), or it is quantized
            weight[ids.to(weight.device)] = rows.detach().to(weight.device, weight.dtype)

    # ------------------------------------------------------------------ activation checkpointing (frozen LLM)
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None,
                                        every_n_layers: int = 1, offload: bool = False) -> int:
        """Checkpoint the frozen LLM's decoder layers (what ``TrainingArguments(activation_checkpointing=True)`` /
        ``gradient_checkpointing=True`` call). Unlike transformers' own switch it works while the LLM stays in
        eval mode (no dropout); ``activation_checkpointing_kwargs`` go to ``torch.utils.checkpoint.checkpoint``
        (default ``use_reentrant=False``). Returns the number of checkpointed layers."""
        count = set_frozen_layer_checkpointing(self.language_model, True, activation_checkpointing_kwargs,
                                               every_n_layers, offload)
        if count == 0:
            raise ValueError(f"{type(self.language_model).__name__} has no GradientCheckpointingLayer decoder layers "
                             "to checkpoint")
        return count

    def activation_checkpointing_disable(self):
        set_frozen_layer_checkpointing(self.language_model, False)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> int:
        """transformers' older name of :meth:`activation_checkpointing_enable`."""
        return self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self):
        self.activation_checkpointing_disable()

    @property
    def is_activation_checkpointing(self) -> bool:
        return count_checkpointed_layers(self.language_model) > 0

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.is_activation_checkpointing

    # ------------------------------------------------------------------ mode and [IMG] rows
    def train(self, mode: bool = True):
        """Adapters follow ``mode``; the frozen backbones always stay in eval mode (no dropout)."""
        super().train(mode)
        self.language_model.eval()
        self.vision_model.eval()
        return self

    def _mean_frozen_row_norm(self, which: str) -> float:
        if which not in self._frozen_row_norm:
            module = (self.language_model.get_input_embeddings() if which == "input"
                      else self.language_model.get_output_embeddings())
            weight = module.weight.detach()
            keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
            keep[[i for i in self._gill_token_ids() if i < weight.shape[0]]] = False  # resized: not GILL's rows
            self._frozen_row_norm[which] = weight[keep].float().norm(dim=1).mean().item()
        return self._frozen_row_norm[which]

    @torch.no_grad()
    def renormalize_img_embeddings(self):
        """Rescale every [IMG] row to the mean norm of the frozen vocabulary rows (the original does this after
        each optimizer step; see ``gill_hf.training`` for the Trainer callback)."""
        rows = [(self.adapter.img_embeddings, "input")]
        if self.adapter.img_output_embeddings is not None:
            rows.append((self.adapter.img_output_embeddings, "output"))
        for param, which in rows:
            target = self._mean_frozen_row_norm(which)
            param.mul_(target / param.float().norm(dim=1, keepdim=True).clamp_min(1e-12).to(param.dtype))
        self._sync_llm_img_rows()

    # ------------------------------------------------------------------ building blocks
    def img_token_slots(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` -> index 0..r-1 of the [IMG] token at each position, -1 elsewhere."""
        match = input_ids.unsqueeze(-1) == self.img_token_ids  # (B, T, r)
        return match.long().argmax(-1).masked_fill(~match.any(-1), -1)

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids -> ``(B, T, e)`` LLM input embeddings with E_img at [IMG] tokens (placeholders zero)."""
        slots = self.img_token_slots(input_ids)
        special = (slots >= 0) | (input_ids == self.config.image_token_id)
        embeds = self.language_model.get_input_embeddings()(input_ids.masked_fill(special, 0))
        img_rows = self.adapter.img_embeddings.to(embeds.dtype)[slots.clamp(min=0)]
        embeds = torch.where((slots >= 0).unsqueeze(-1), img_rows, embeds)
        return embeds.masked_fill((input_ids == self.config.image_token_id).unsqueeze(-1), 0.0)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``(N, 3, H, W)`` -> the frozen encoder's features in the adapter's dtype: ``(N, d)`` pooled CLIP
        features (post-LayerNorm CLS, no CLIP projection) for "clip_pooled", else ``(N, k, d)`` per visual token
        (``gill_hf.visual_encoders``)."""
        features = image_features(self.config.visual_encoder, self.vision_model, pixel_values)
        return features.to(self.adapter.w_i2t.weight.dtype)

    def visual_prefix(self, image_features: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_images` features -> ``(N, k, e)``: the LLM input vectors of each image (Eq. 1): W_cap of
        the pooled vector split into k, or W_cap of each of the k visual tokens."""
        n, k = image_features.shape[0], self.config.num_visual_tokens
        pooled = self.config.visual_encoder == "clip_pooled"
        expected = (n, self.config.vision_dim) if pooled else (n, k, self.config.vision_dim)
        if tuple(image_features.shape) != expected:
            raise ValueError(f"image features have shape {tuple(image_features.shape)}, expected {expected} for "
                             f"visual_encoder={self.config.visual_encoder!r} (model.encode_images gives them)")
        return self.adapter.w_cap(image_features).view(n, k, -1)

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids with ``<|image|>`` placeholders + :meth:`encode_images` features (``(N, d)`` or ``(N, k, d)``)
        -> ``(B, T, e)`` inputs_embeds."""
        prefix = None if image_features is None or image_features.shape[0] == 0 else self.visual_prefix(image_features)
        return self.merge_visual_prefix(self.embed_tokens(input_ids), input_ids, prefix)

    def merge_visual_prefix(self, embeds: torch.Tensor, input_ids: torch.Tensor, prefix: torch.Tensor | None
                            ) -> torch.Tensor:
        """Write the ``(N, k, e)`` visual prefixes over the ``<|image|>`` placeholders of ``(B, T, e)`` embeds, in
        reading order; the placeholder count must be N x k."""
        placeholders = input_ids == self.config.image_token_id
        n_slots, k = int(placeholders.sum()), self.config.num_visual_tokens
        n_images = 0 if prefix is None else prefix.shape[0]
        if n_slots != n_images * k:
            raise ValueError(f"input_ids hold {n_slots} image placeholder tokens ({n_slots / k:g} images at "
                             f"k={k}) but {n_images} images were given")
        if n_images:
            embeds = embeds.masked_scatter(placeholders.unsqueeze(-1), prefix.to(embeds.dtype))
        return embeds

    def get_image_features(self, pixel_values: torch.Tensor, return_dict: bool = True):
        """``(N, 3, H, W)`` -> ``pooler_output`` ``(N, k, e)``: each image's k LLM input vectors (Eq. 1), as
        transformers' VLMs return them (``generate`` encodes the images once through this)."""
        out = BaseModelOutputWithPooling(pooler_output=self.visual_prefix(self.encode_images(pixel_values)))
        return out if return_dict else out.to_tuple()

    def img_logits(self, final_states: torch.Tensor) -> torch.Tensor:
        """``(..., e_out)`` last-layer states -> ``(..., r)`` logits of the [IMG] tokens."""
        weight = self.adapter.img_output_weight
        return (final_states.to(weight.dtype) @ weight.t()).to(final_states.dtype)

    def full_logits(self, lm_logits: torch.Tensor, final_states: torch.Tensor) -> torch.Tensor:
        """LLM logits ``(B, T, V)`` + [IMG] logits at the [IMG] ids -> ``(B, T, V')``. The placeholder scores -inf,
        or keeps the LLM's own logit with ``config.mask_image_token_logit=False`` (the original's softmax)."""
        ids, placeholder = self.img_token_ids, self.config.image_token_id
        if not self.config.mask_image_token_logit and placeholder >= lm_logits.shape[-1]:
            raise ValueError(f"mask_image_token_logit=False keeps the LLM's own logit for <|image|> (id {placeholder}) "
                             f"but the LLM scores only {lm_logits.shape[-1]} tokens: resize it "
                             "(model.resize_token_embeddings(len(processor.tokenizer)), as the original does) or "
                             "keep mask_image_token_logit=True")
        vocab = max(lm_logits.shape[-1], int(ids.max()) + 1, placeholder + 1)
        logits = F.pad(lm_logits, (0, vocab - lm_logits.shape[-1]), value=float("-inf"))
        img = self.img_logits(final_states).to(logits.dtype)  # under autocast the LM logits are bf16 / fp16
        logits = logits.scatter(-1, ids.expand(*img.shape[:-1], -1), img)
        if self.config.mask_image_token_logit:
            logits[..., placeholder] = float("-inf")
        return logits

    def run_language_model(self, inputs_embeds: torch.Tensor, attention_mask: torch.Tensor, **kwargs):
        """Frozen LLM pass -> (full logits incl. [IMG], ``hidden_states[config.hidden_layer]`` in adapter dtype).

        ``logits_to_keep=n`` (a kwarg of the LLM) returns logits for the last n positions only."""
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  output_hidden_states=True, **kwargs)
        logits = self.full_logits(out.logits, out.hidden_states[-1][:, -out.logits.shape[1]:])
        features = out.hidden_states[self.config.hidden_layer].to(self.adapter.w_t2i.weight.dtype)
        return logits, features, out

    def img_block_positions(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows and columns ``(n_blocks, r)`` of each complete [IMG0..r-1] block, in reading order."""
        r = self.config.num_img_tokens
        rows, cols = (self.img_token_slots(input_ids) >= 0).nonzero(as_tuple=True)
        if rows.numel() % r:
            raise ValueError(f"found {rows.numel()} [IMG] tokens, not a whole number of {r}-token blocks")
        rows, cols = rows.view(-1, r), cols.view(-1, r)
        if rows.numel() and ((rows != rows[:, :1]).any() or (cols - cols[:, :1] != torch.arange(r, device=cols.device)).any()):
            raise ValueError("[IMG] tokens must appear as contiguous [IMG0]..[IMG{r-1}] blocks")
        return rows, cols

    def mapper_inputs(self, voken_states: torch.Tensor) -> torch.Tensor:
        """``(N, r, f)`` voken states, plus the [IMG] input embeddings when GILL's residual is on."""
        if self.config.mapper_add_input_embeddings:
            return voken_states + self.adapter.img_embeddings.to(voken_states.dtype)
        return voken_states

    def gen_embeddings(self, voken_states: torch.Tensor) -> torch.Tensor:
        """``(N, r, f)`` voken states -> ``(N, L, D)`` diffusion conditioning (Eq. 3's f_omega)."""
        return self.adapter.mapper(self.mapper_inputs(voken_states))

    def gen_pooled_embeddings(self, gen_embeds: torch.Tensor) -> torch.Tensor:
        """``(N, L, D)`` mapper outputs -> ``(N, P)`` pooled conditioning, for layouts that take one (SDXL)."""
        if self.adapter.pooled_head is None:
            raise ValueError(f"the {self.config.diffusion_layout} target layout has no pooled vector")
        return self.adapter.pooled_head(gen_embeds)

    def mapped_null_embedding(self) -> torch.Tensor:
        """MiniGPT-5's unconditional embedding: the mapper applied to all-zero voken features, ``(1, L, D)``."""
        zeros = torch.zeros(1, self.config.num_img_tokens, self.config.llm_feature_dim,
                            device=self.adapter.logit_scale.device, dtype=self.adapter.w_t2i.weight.dtype)
        return self.adapter.mapper(zeros)

    def text_retrieval_embeddings(self, img0_states: torch.Tensor) -> torch.Tensor:
        """``(N, f)`` [IMG1] states -> ``(N, p)`` = W_t2i h (unnormalised)."""
        return self.adapter.w_t2i(img0_states)

    def image_retrieval_embeddings(self, image_features: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_images` features -> ``(N, p)`` = W_i2t v(x) (unnormalised), v(x) the encoder's image
        vector: CLIP's / SigLIP's pooled output, the mean of the Q-Former's query outputs
        (``gill_hf.visual_encoders.retrieval_vector``)."""
        return self.adapter.w_i2t(retrieval_vector(self.config.visual_encoder, self.vision_model, image_features))

    # ------------------------------------------------------------------ scoring (gill_hf.scoring)
    def score_continuations(self, prompt, candidates, batch_size: int = 8, reduction: str = "sum"):
        """Log-likelihood of each candidate text after an interleaved ``prompt``, reusing the prompt's KV cache;
        see :func:`gill_hf.scoring.score_continuations`."""
        from .scoring import score_continuations

        return score_continuations(self, prompt, candidates, batch_size=batch_size, reduction=reduction)

    def log_likelihood(self, prompt) -> torch.Tensor:
        """The original's ``get_log_likelihood_scores`` (minus the token-mean CE of the prompt's text); see
        :func:`gill_hf.scoring.sequence_log_likelihood`."""
        from .scoring import sequence_log_likelihood

        return sequence_log_likelihood(self, prompt)

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids: torch.LongTensor | None = None, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, position_ids: torch.LongTensor | None = None,
                cache=None, inputs_embeds: torch.Tensor | None = None, labels: torch.LongTensor | None = None,
                use_cache: bool | None = None, logits_to_keep: int | torch.Tensor = 0,
                mm_encoder_outputs: dict | None = None, output_attentions: bool | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                gill_objective: bool = False, gen_targets: torch.Tensor | None = None,
                null_gen_target: torch.Tensor | None = None, pack: bool | None = None,
                gen_pooled_targets: torch.Tensor | None = None, null_gen_pooled_target: torch.Tensor | None = None):
        """The standard inference forward, or (``gill_objective=True``) GILL's training objective.

        Inference: ``input_ids`` ``(B, T)`` with ``<|image|>`` placeholders and ``pixel_values`` ``(N, 3, H, W)``
        (or the prefixes in ``mm_encoder_outputs["image"].pooler_output`` ``(N, k, e)``, or ``inputs_embeds``)
        -> :class:`GILLCausalLMOutputWithPast` with logits over the LLM vocabulary + [IMG] tokens, the cache, and
        the mean next-token cross-entropy over ``labels`` (-100 ignored; shifted here) when given.

        ``gill_objective=True``: Eq. 5 on a caption batch (:meth:`gill_objective`; ``gen_targets``,
        ``null_gen_target``, ``pack`` and, for layouts with a pooled vector, ``gen_pooled_targets`` /
        ``null_gen_pooled_target`` only apply there), as the Trainer recipe calls it.
        """
        if gill_objective:
            unused = {"position_ids": position_ids is not None, "cache": cache is not None,
                      "inputs_embeds": inputs_embeds is not None, "mm_encoder_outputs": mm_encoder_outputs is not None,
                      "use_cache": bool(use_cache), "logits_to_keep": logits_to_keep != 0,
                      "output_attentions": bool(output_attentions), "output_hidden_states": bool(output_hidden_states),
                      "return_dict": return_dict is False}
            given = sorted(k for k, v in unused.items() if v)
            if given:
                raise ValueError(f"{given} do not apply to the training objective (gill_objective=True)")
            pooled = {k: v for k, v in (("gen_pooled_targets", gen_pooled_targets),
                                        ("null_gen_pooled_target", null_gen_pooled_target)) if v is not None}
            return self.gill_objective(input_ids, attention_mask, pixel_values, labels=labels,
                                       gen_targets=gen_targets, null_gen_target=null_gen_target, pack=pack, **pooled)
        training_only = sorted(k for k, v in (("gen_targets", gen_targets), ("null_gen_target", null_gen_target),
                                              ("pack", pack), ("gen_pooled_targets", gen_pooled_targets),
                                              ("null_gen_pooled_target", null_gen_pooled_target)) if v is not None)
        if training_only:
            raise ValueError(f"{training_only} are inputs of the training objective: pass gill_objective=True")
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids or inputs_embeds")
        image = (mm_encoder_outputs or {}).get("image")
        if image is not None and pixel_values is not None:
            raise ValueError("pass either pixel_values or mm_encoder_outputs, not both")
        prefix = image.pooler_output if image is not None else \
            self.get_image_features(pixel_values).pooler_output if pixel_values is not None else None
        if inputs_embeds is None:
            inputs_embeds = self.merge_visual_prefix(self.embed_tokens(input_ids), input_ids, prefix)
        elif prefix is not None:
            raise ValueError("images with inputs_embeds: merge them into inputs_embeds (model.embed_inputs)")
        out = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=use_cache,
                                  logits_to_keep=logits_to_keep, output_attentions=output_attentions,
                                  output_hidden_states=True, return_dict=True)
        logits = self.full_logits(out.logits, out.hidden_states[-1][:, -out.logits.shape[1]:])
        loss = self._lm_loss(logits, labels) if labels is not None else None
        output = GILLCausalLMOutputWithPast(loss=loss, logits=logits, cache=out.cache,
                                            hidden_states=out.hidden_states if output_hidden_states else None,
                                            attentions=out.attentions, image_hidden_states=prefix)
        return output if return_dict is not False else output.to_tuple()

    # ------------------------------------------------------------------ training objective (Eq. 5)
    def gill_objective(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                       gen_targets: torch.Tensor | None = None, null_gen_target: torch.Tensor | None = None,
                       pack: bool | None = None, gen_pooled_targets: torch.Tensor | None = None,
                       null_gen_pooled_target: torch.Tensor | None = None) -> GILLOutput:
        """All four losses of Eq. 5 on a batch of N image-caption pairs.

        Args:
            input_ids: ``(N, T)`` right-padded ``"<bos> caption [IMG0]..[IMG{r-1}]"`` (``processor.encode_captions``).
            attention_mask: ``(N, T)``.
            pixel_values: ``(N, 3, H, W)`` one image per caption; enables l_c and l_r. CLIP runs once per image.
            labels: not used by this stage-1 objective (stage 2: ``GILLForInterleavedTraining``); must be None.
            gen_targets: ``(N, L, D)`` precomputed diffusion text-encoder outputs for the captions; enables l_g.
            null_gen_target: ``(L, D)`` text-encoder output of ``""``, the target of CFG-dropped examples.
            gen_pooled_targets / null_gen_pooled_target: ``(N, P)`` / ``(P,)`` pooled text vectors, with
                ``gen_targets`` for layouts that take one (SDXL, SD3, Flux): the pooled head's own l_g term is
                added to the sequence's (so it weighs as much as all L tokens together).
            pack: force (True) or forbid (False) packing pairs of examples; None samples it with ``pack_prob``
                in training mode, independently for the two passes, as the paper does.
        """
        if labels is not None:
            raise ValueError("the stage-1 objective builds its own targets; batches with labels (MiniGPT-5 stage 2) "
                             "need GILLForInterleavedTraining")
        cfg = self.config
        n = input_ids.shape[0]
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        lengths = attention_mask.sum(1)
        pad_id = self.language_model.config.pad_token_id or 0
        out = {}
        terms = []

        # Text-only pass "<bos> caption [IMG]": l_p, and the [IMG] states for retrieval and generation.
        text_ids, text_len = self._maybe_pack(input_ids, lengths, pad_id, pack, drop_in_second=0)
        logits, features, _ = self.run_language_model(self.embed_tokens(text_ids), self._mask(text_ids, text_len),
                                                      use_cache=False)
        out["img_token_loss"] = self._lm_loss(logits, self._img_token_labels(text_ids, text_len))
        terms.append(cfg.img_token_loss_weight * out["img_token_loss"])
        rows, cols = self.img_block_positions(text_ids)
        if rows.shape[0] != n:
            raise ValueError(f"{n} captions but {rows.shape[0]} [IMG] blocks: every caption needs exactly one")
        out["img_hidden_states"] = features[rows, cols]  # (N, r, f) at the [IMG] tokens
        out["text_embeds"] = self.text_retrieval_embeddings(out["img_hidden_states"][:, 0])

        if gen_targets is not None:
            voken_states = out["img_hidden_states"] if cfg.voken_feature_position == "at_token" \
                else features[rows, cols - 1]  # MiniGPT-5: the states that predict [IMG0..r-1]
            out["gen_embeds"], gen_targets, pooled_targets = self._generation_inputs(
                voken_states, gen_targets, null_gen_target, gen_pooled_targets, null_gen_pooled_target)
            out["gen_loss"] = generation_loss(out["gen_embeds"], gen_targets, cfg.gen_loss_type)
            if pooled_targets is not None:
                pooled = self.gen_pooled_embeddings(out["gen_embeds"])[:, None]  # (N, 1, P)
                out["gen_loss"] = out["gen_loss"] + generation_loss(pooled, pooled_targets[:, None], cfg.gen_loss_type)
            terms.append(cfg.gen_loss_weight * out["gen_loss"])

        if pixel_values is not None:
            if pixel_values.shape[0] != n:
                raise ValueError(f"{n} captions but {pixel_values.shape[0]} images: the pairs must align")
            image_features = self.encode_images(pixel_values)  # CLIP once, shared by l_c and l_r
            out["caption_loss"] = self._caption_loss(input_ids, lengths, image_features, pad_id, pack)
            out["image_embeds"] = self.image_retrieval_embeddings(image_features)
            text_embeds, image_embeds = out["text_embeds"], out["image_embeds"]
            if self.contrastive_gather is not None:  # InfoNCE over the global batch under data parallelism
                text_embeds, image_embeds = self.contrastive_gather(text_embeds), self.contrastive_gather(image_embeds)
            out["ret_loss"] = contrastive_loss(text_embeds, image_embeds, self.adapter.logit_scale)
            terms += [cfg.caption_loss_weight * out["caption_loss"], cfg.ret_loss_weight * out["ret_loss"]]

        return GILLOutput(loss=torch.stack([t.float() for t in terms]).sum(), **out)

    def _maybe_pack(self, ids, lengths, pad_id, pack, drop_in_second):
        if pack is None:
            pack = self.training and self.config.pack_prob > 0 and \
                bool(torch.rand(()) < self.config.pack_prob)
        if pack and ids.shape[0] > 1:
            return pack_pairs(ids, lengths, pad_id, drop_in_second)
        return ids, lengths

    @staticmethod
    def _mask(ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return (torch.arange(ids.shape[1], device=ids.device)[None] < lengths[:, None]).long()

    def _img_token_labels(self, ids, lengths):
        """l_p targets: [IMG0] (and, as the original, the caption tokens); later [IMG] tokens and pads ignored.
        ``config.packed_lp_first_caption_only`` also ignores everything from a row's first [IMG1] on (the
        original's mask: a packed row supervises its first caption only)."""
        slots = self.img_token_slots(ids)
        keep = self._mask(ids, lengths).bool() & (slots <= 0)
        if not self.config.lp_supervise_caption:
            keep &= slots == 0
        if self.config.packed_lp_first_caption_only:
            keep &= (slots == 1).cumsum(1) == 0
        return ids.masked_fill(~keep, IGNORE_INDEX)

    def _caption_loss(self, input_ids, lengths, image_features, pad_id, pack):
        """l_c (Eq. 1): NLL of the caption after the k visual tokens; the [IMG] block is dropped from this pass."""
        k = self.config.num_visual_tokens
        caption_len = lengths - (self.img_token_slots(input_ids) >= 0).sum(1) + k  # [IMG] block is at the end
        ids = torch.cat([input_ids.new_full((input_ids.shape[0], k), self.config.image_token_id), input_ids], 1)
        ids, caption_len = self._maybe_pack(ids, caption_len, pad_id, pack, drop_in_second=k)
        ids = ids[:, :int(caption_len.max())]
        mask = self._mask(ids, caption_len)
        logits, _, _ = self.run_language_model(self.embed_inputs(ids, image_features), mask, use_cache=False)
        labels = ids.masked_fill(~mask.bool() | (ids == self.config.image_token_id), IGNORE_INDEX)
        return self._lm_loss(logits, labels)

    def _generation_inputs(self, voken_states, gen_targets, null_gen_target, pooled_targets=None,
                           null_pooled_target=None):
        """Mapper outputs for the N examples, the sequence targets and the pooled targets (None for layouts without
        one), with MiniGPT-5's CFG dropout applied to inputs and targets."""
        cfg = self.config
        expected = (voken_states.shape[0], cfg.num_gen_queries, cfg.gen_emb_dim)
        if tuple(gen_targets.shape) != expected:
            raise ValueError(f"gen_targets have shape {tuple(gen_targets.shape)}, expected {expected} "
                             f"(N, num_gen_queries, gen_emb_dim)")
        self._check_pooled_targets(voken_states.shape[0], pooled_targets)
        states = self.mapper_inputs(voken_states)
        gen_targets = gen_targets.to(states.dtype)
        if self.training and cfg.cfg_dropout_prob > 0:
            if null_gen_target is None:
                raise ValueError("cfg_dropout_prob > 0 needs null_gen_target (the text encoder's output for \"\")")
            drop = torch.rand(states.shape[0], device=states.device) < cfg.cfg_dropout_prob  # (N,)
            states = states.masked_fill(drop[:, None, None], 0.0)
            gen_targets = torch.where(drop[:, None, None], null_gen_target.to(gen_targets), gen_targets)
            if pooled_targets is not None:
                if null_pooled_target is None:
                    raise ValueError("cfg_dropout_prob > 0 needs null_gen_pooled_target (the pooled vector of \"\")")
                pooled_targets = torch.where(drop[:, None], null_pooled_target.to(pooled_targets), pooled_targets)
        return self.adapter.mapper(states), gen_targets, pooled_targets

    def _check_pooled_targets(self, n: int, pooled_targets):
        """Pooled targets come exactly with layouts that take a pooled vector, ``(N, gen_pooled_dim)``."""
        cfg = self.config
        if cfg.gen_pooled_dim is None:
            if pooled_targets is not None:
                raise ValueError(f"gen_pooled_targets given, but the {cfg.diffusion_layout} layout has no pooled "
                                 f"vector")
            return
        if pooled_targets is None:
            raise ValueError(f"the {cfg.diffusion_layout} layout needs gen_pooled_targets (N, {cfg.gen_pooled_dim}) "
                             f"with gen_targets (a target store precomputed for this diffusion model)")
        if tuple(pooled_targets.shape) != (n, cfg.gen_pooled_dim):
            raise ValueError(f"gen_pooled_targets have shape {tuple(pooled_targets.shape)}, expected "
                             f"{(n, cfg.gen_pooled_dim)} (N, gen_pooled_dim)")

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean next-token cross-entropy (labels shifted here), computed in fp32."""
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
