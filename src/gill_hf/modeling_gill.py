"""GILLForConditionalGeneration: a frozen causal LLM + frozen CLIP vision encoder joined by trainable GILL adapters.

Shapes use: N examples (images), B sequences, T tokens, k visual tokens, r [IMG] tokens, e LLM embedding width,
f width of the LLM states that feed the heads, d CLIP width, p retrieval width, L x D diffusion conditioning.
"""

import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, CLIPVisionConfig, CLIPVisionModel, PreTrainedModel
from transformers.utils import ModelOutput, cached_file

from .configuration_gill import GILLConfig
from .losses import contrastive_loss, generation_loss
from .mapper import build_mapper
from .packing import pack_pairs

ADAPTER_PREFIX = "adapter."
ADAPTER_WEIGHTS_NAME = "model.safetensors"
LORA_SUBFOLDER = "lora"  # peft adapter of a LoRA-tuned language model, saved beside the GILL adapter
IGNORE_INDEX = -100


class GILLAdapter(nn.Module):
    """Every trainable GILL tensor (paper Sec. 3); ~50M parameters for OPT-6.7B + CLIP ViT-L + SD-1.5."""

    def __init__(self, config: GILLConfig):
        super().__init__()
        k, r, p = config.num_visual_tokens, config.num_img_tokens, config.ret_emb_dim
        e, f, d = config.llm_embed_dim, config.llm_feature_dim, config.vision_dim
        self.w_cap = nn.Linear(d, k * e)  # pooled image -> k LLM input vectors (Eq. 1)
        self.img_embeddings = nn.Parameter(torch.randn(r, e) * 0.02)  # E_img: [IMG] input rows (Eq. 2)
        if config.tie_img_embeddings:  # tied LLM: the same rows score the [IMG] tokens, as the original
            self.register_parameter("img_output_embeddings", None)
        else:
            self.img_output_embeddings = nn.Parameter(torch.randn(r, config.llm_output_dim) * 0.02)
        self.w_t2i = nn.Linear(f, p)  # [IMG1] state -> retrieval space (Eq. 4)
        self.w_i2t = nn.Linear(d, p)  # pooled image -> retrieval space (Eq. 4)
        self.logit_scale = nn.Parameter(torch.tensor(config.logit_scale_init))  # 1 / tau
        self.mapper = build_mapper(config, f)  # f_omega (Eq. 3)
        self.decision_head = nn.Sequential(  # retrieve-vs-generate classifier, label 0 = gen, 1 = ret (Sec. 3.3)
            nn.Dropout(config.decision_dropout), nn.Linear(f + int(config.decision_use_retrieval_score), 2))

    @property
    def img_output_weight(self) -> torch.Tensor:  # (r, e_out)
        return self.img_embeddings if self.img_output_embeddings is None else self.img_output_embeddings


def count_adapter_parameters(config: GILLConfig) -> dict[str, int]:
    """Trainable parameter counts per part, computed on the meta device (no weights are allocated)."""
    with torch.device("meta"):
        adapter = GILLAdapter(config)
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in adapter.named_children()}
    counts.update({name: p.numel() for name, p in adapter.named_parameters(recurse=False)})
    counts["total"] = sum(p.numel() for p in adapter.parameters())
    return counts


@dataclass
class GILLOutput(ModelOutput):
    """Training outputs. ``loss`` is the weighted sum of Eq. 5; each term is also returned on its own.

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


class GILLForConditionalGeneration(GILLPreTrainedModel):
    """GILL: frozen ``language_model`` (any causal LM) and ``vision_model`` (CLIP), trainable ``adapter``.

    Build from backbone ids with :meth:`from_backbones`; load a trained adapter with :meth:`from_pretrained`.
    ``save_pretrained`` writes only the adapter (plus config and, if attached, the processor).
    """

    accepts_loss_kwargs = False  # forward returns per-batch means; the Trainer scales for accumulation

    def __init__(self, config: GILLConfig, language_model: PreTrainedModel | None = None,
                 vision_model: CLIPVisionModel | None = None):
        super().__init__(config)
        if config.img_token_ids is None or config.image_token_id is None:
            raise ValueError("GILLConfig.img_token_ids / image_token_id are unset: build the model with "
                             "GILLForConditionalGeneration.from_backbones(...), which adds the tokens")
        self.language_model = language_model or AutoModelForCausalLM.from_config(config.text_config)
        self.vision_model = vision_model or CLIPVisionModel(config.vision_config)
        for backbone in (self.language_model, self.vision_model):
            backbone.requires_grad_(False)
            backbone.eval()
        self._check_backbone_widths()
        self.adapter = GILLAdapter(config).to(self._backbone_device)
        # The decision head is fit after the rest has converged (paper Sec. 3.3), not by Eq. 5: keep it out of the
        # optimizer (and out of DDP's unused-parameter check) until decision training switches it on.
        self.adapter.decision_head.requires_grad_(False)
        self.register_buffer("img_token_ids", torch.tensor(config.img_token_ids), persistent=False)
        self.processor = None  # a GILLProcessor, attached by from_backbones / from_pretrained
        self._frozen_row_norm: dict[str, float] = {}
        # Data-parallel hook (set by gill_hf.training): (n, p) local embeddings -> (N_global, p) for l_r.
        self.contrastive_gather = None
        self.post_init()
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
        if self.vision_model.config.hidden_size != self.config.vision_dim:
            raise ValueError(f"vision encoder is {self.vision_model.config.hidden_size} wide, config expects "
                             f"{self.config.vision_dim}")
        if self.config.mapper_add_input_embeddings and self.config.llm_feature_dim != self.config.llm_embed_dim:
            raise ValueError(f"mapper_add_input_embeddings needs hidden_layer states ({self.config.llm_feature_dim}) "
                             f"as wide as the input embeddings ({self.config.llm_embed_dim})")

    @property
    def _backbone_device(self) -> torch.device:
        return self.language_model.get_input_embeddings().weight.device

    @classmethod
    def from_backbones(cls, text_model: str, vision_model: str, diffusion_model: str | None = None, *,
                       dtype: torch.dtype | None = None, device_map=None, **config_kwargs):
        """A fresh (untrained) GILL on backbones given by Hub id or local path; attaches its processor.

        ``gen_emb_dim`` is read from the diffusion model's text encoder unless given.
        """
        from transformers import AutoImageProcessor, AutoTokenizer

        from .processing_gill import GILLProcessor

        tokenizer = AutoTokenizer.from_pretrained(text_model)
        image_processor = AutoImageProcessor.from_pretrained(vision_model, backend="pil")
        processor = GILLProcessor(image_processor, tokenizer,
                                  num_visual_tokens=config_kwargs.get("num_visual_tokens", 4),
                                  num_img_tokens=config_kwargs.get("num_img_tokens", 8))
        if diffusion_model is not None and "gen_emb_dim" not in config_kwargs:
            config_kwargs["gen_emb_dim"] = AutoConfig.from_pretrained(diffusion_model,
                                                                      subfolder="text_encoder").hidden_size
        config = GILLConfig(
            text_config=AutoConfig.from_pretrained(text_model).to_dict(),
            vision_config=CLIPVisionConfig.from_pretrained(vision_model).to_dict(),
            text_model_name_or_path=text_model, vision_model_name_or_path=vision_model,
            diffusion_model_name_or_path=diffusion_model, img_token_ids=processor.img_token_ids,
            image_token_id=processor.image_token_id, **config_kwargs)
        model = cls(config, *cls._load_backbones(config, dtype=dtype, device_map=device_map))
        model.processor = processor
        return model

    @staticmethod
    def _load_backbones(config: GILLConfig, dtype=None, device_map=None):
        for name in ("text_model_name_or_path", "vision_model_name_or_path"):
            if not getattr(config, name):
                raise ValueError(f"GILLConfig.{name} is empty: the frozen backbone cannot be loaded")
        llm = AutoModelForCausalLM.from_pretrained(config.text_model_name_or_path, dtype=dtype, device_map=device_map)
        vision = CLIPVisionModel.from_pretrained(config.vision_model_name_or_path, dtype=dtype)
        return llm, vision.to(llm.get_input_embeddings().weight.device)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *, config: GILLConfig | None = None,
                        dtype: torch.dtype | None = None, device_map=None, language_model=None, vision_model=None,
                        **hub_kwargs):
        """Load the frozen backbones from the ids in ``config.json``, then the adapter with an exact key check.

        ``hub_kwargs`` (``revision``, ``token``, ``cache_dir``, ``local_files_only``...) go to the Hub download.
        Pass ``language_model`` / ``vision_model`` to reuse backbones already in memory.
        """
        path = os.fspath(pretrained_model_name_or_path)
        config = config or GILLConfig.from_pretrained(path, **hub_kwargs)
        if language_model is None or vision_model is None:
            llm, vision = cls._load_backbones(config, dtype=dtype, device_map=device_map)
            language_model, vision_model = language_model or llm, vision_model or vision
        model = cls(config, language_model=language_model, vision_model=vision_model)
        from .hub import load_adapter_weights  # model.safetensors, or its shards

        model.load_adapter_state_dict(*load_adapter_weights(path, **hub_kwargs))
        if cached_file(path, f"{LORA_SUBFOLDER}/adapter_config.json", _raise_exceptions_for_missing_entries=False,
                       **hub_kwargs):  # a LoRA-tuned LLM (MiniGPT-5 stage 2): re-apply the peft adapter
            from peft import PeftModel

            model.language_model = PeftModel.from_pretrained(model.language_model, path, subfolder=LORA_SUBFOLDER,
                                                             **hub_kwargs)
        if dtype is not None:
            model.adapter.to(dtype)
        if cached_file(path, "processor_config.json", _raise_exceptions_for_missing_entries=False, **hub_kwargs):
            from .processing_gill import GILLProcessor

            model.processor = GILLProcessor.from_pretrained(path, **hub_kwargs)
        return model.eval()

    # ------------------------------------------------------------------ adapter-only persistence
    def adapter_state_dict(self, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The trainable entries of ``state_dict`` (default: this model's), keys as stored on disk."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        return {k: v for k, v in state_dict.items() if k.startswith(ADAPTER_PREFIX)}

    def load_adapter_state_dict(self, state_dict: dict[str, torch.Tensor], source: str = "state dict"):
        """Copy adapter weights in; any missing / unexpected key or wrong shape raises one error listing them all."""
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        wrong = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(own) & set(state_dict)) if state_dict[k].shape != own[k].shape]
        if missing or unexpected or wrong:
            parts = [f"{label} ({len(items)}): {items}" for label, items in
                     (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", wrong)) if items]
            raise ValueError(f"adapter weights in {source} do not match this GILL model; " + "; ".join(parts))
        with torch.no_grad():
            for key, value in state_dict.items():
                own[key].copy_(value)
        self._frozen_row_norm.clear()

    def save_pretrained(self, save_directory: str | os.PathLike, state_dict=None, processor=None, **kwargs):
        """Write config.json, the adapter as ``model.safetensors`` and the processor; never the backbones.

        Files are written to a temporary folder beside ``save_directory`` and moved in at the end, so an
        interrupted save leaves no half-written file. ``state_dict`` (as the Trainer passes it) is filtered.
        """
        target = os.fspath(save_directory)
        os.makedirs(target, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=".gill-save-", dir=os.path.dirname(os.path.abspath(target)))
        try:
            super().save_pretrained(staging, state_dict=self.adapter_state_dict(state_dict), **kwargs)
            processor = processor or self.processor
            if processor is not None:
                processor.save_pretrained(staging)
            if hasattr(self.language_model, "peft_config"):  # LoRA on the LLM: a peft adapter beside ours
                self.language_model.save_pretrained(os.path.join(staging, LORA_SUBFOLDER))
            for name in os.listdir(staging):
                if os.path.isdir(os.path.join(target, name)):
                    shutil.rmtree(os.path.join(target, name))
                os.replace(os.path.join(staging, name), os.path.join(target, name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def push_to_hub(self, repo_id: str, **kwargs):
        """Upload adapter, config, processor, LoRA adapter and a gill_hf model card in one commit; see
        :func:`gill_hf.hub.push_to_hub` for the options (``revision``, ``retrieval_index``, card fields...)."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

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
            self._frozen_row_norm[which] = module.weight.detach().float().norm(dim=1).mean().item()
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
        """``(N, 3, H, W)`` -> pooled CLIP features ``(N, d)`` (post-LayerNorm CLS, no CLIP projection)."""
        pooled = self.vision_model(pixel_values=pixel_values.to(self.vision_model.dtype)).pooler_output
        return pooled.to(self.adapter.w_cap.weight.dtype)

    def visual_prefix(self, image_features: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` -> ``(N, k, e)``: v(x)^T W_cap, the LLM input vectors of each image (Eq. 1)."""
        return self.adapter.w_cap(image_features).view(image_features.shape[0], self.config.num_visual_tokens, -1)

    def embed_inputs(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids with ``<|image|>`` placeholders + ``(N, d)`` image features -> ``(B, T, e)`` inputs_embeds."""
        embeds = self.embed_tokens(input_ids)
        placeholders = input_ids == self.config.image_token_id
        n_slots, k = int(placeholders.sum()), self.config.num_visual_tokens
        n_images = 0 if image_features is None else image_features.shape[0]
        if n_slots != n_images * k:
            raise ValueError(f"input_ids hold {n_slots} image placeholder tokens ({n_slots / k:g} images at "
                             f"k={k}) but {n_images} images were given")
        if n_images:
            prefix = self.visual_prefix(image_features).to(embeds.dtype)
            embeds = embeds.masked_scatter(placeholders.unsqueeze(-1), prefix)
        return embeds

    def img_logits(self, final_states: torch.Tensor) -> torch.Tensor:
        """``(..., e_out)`` last-layer states -> ``(..., r)`` logits of the [IMG] tokens."""
        weight = self.adapter.img_output_weight
        return (final_states.to(weight.dtype) @ weight.t()).to(final_states.dtype)

    def full_logits(self, lm_logits: torch.Tensor, final_states: torch.Tensor) -> torch.Tensor:
        """LLM logits ``(B, T, V)`` + [IMG] logits at the [IMG] ids -> ``(B, T, V')``; the placeholder is -inf."""
        ids = self.img_token_ids
        vocab = max(lm_logits.shape[-1], int(ids.max()) + 1, self.config.image_token_id + 1)
        logits = F.pad(lm_logits, (0, vocab - lm_logits.shape[-1]), value=float("-inf"))
        img = self.img_logits(final_states)
        logits = logits.scatter(-1, ids.expand(*img.shape[:-1], -1), img)
        logits[..., self.config.image_token_id] = float("-inf")
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

    def mapped_null_embedding(self) -> torch.Tensor:
        """MiniGPT-5's unconditional embedding: the mapper applied to all-zero voken features, ``(1, L, D)``."""
        zeros = torch.zeros(1, self.config.num_img_tokens, self.config.llm_feature_dim,
                            device=self.adapter.logit_scale.device, dtype=self.adapter.w_t2i.weight.dtype)
        return self.adapter.mapper(zeros)

    def text_retrieval_embeddings(self, img0_states: torch.Tensor) -> torch.Tensor:
        """``(N, f)`` [IMG1] states -> ``(N, p)`` = W_t2i h (unnormalised)."""
        return self.adapter.w_t2i(img0_states)

    def image_retrieval_embeddings(self, image_features: torch.Tensor) -> torch.Tensor:
        """``(N, d)`` pooled CLIP features -> ``(N, p)`` = W_i2t v(x) (unnormalised)."""
        return self.adapter.w_i2t(image_features)

    # ------------------------------------------------------------------ inference
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 pixel_values: torch.Tensor | None = None, **kwargs):
        """KV-cached interleaved decoding (text + [IMG] blocks with their hidden states); see
        :func:`gill_hf.generation_gill.generate_interleaved` for the options."""
        from .generation_gill import generate_interleaved

        return generate_interleaved(self, input_ids, attention_mask, pixel_values, **kwargs)

    # ------------------------------------------------------------------ training forward (Eq. 5)
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                pixel_values: torch.Tensor | None = None, gen_targets: torch.Tensor | None = None,
                null_gen_target: torch.Tensor | None = None, pack: bool | None = None) -> GILLOutput:
        """All four losses of Eq. 5 on a batch of N image-caption pairs.

        Args:
            input_ids: ``(N, T)`` right-padded ``"<bos> caption [IMG0]..[IMG{r-1}]"`` (``processor.encode_captions``).
            attention_mask: ``(N, T)``.
            pixel_values: ``(N, 3, H, W)`` one image per caption; enables l_c and l_r. CLIP runs once per image.
            gen_targets: ``(N, L, D)`` precomputed diffusion text-encoder outputs for the captions; enables l_g.
            null_gen_target: ``(L, D)`` text-encoder output of ``""``, the target of CFG-dropped examples.
            pack: force (True) or forbid (False) packing pairs of examples; None samples it with ``pack_prob``
                in training mode, independently for the two passes, as the paper does.
        """
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
            out["gen_embeds"], gen_targets = self._generation_inputs(voken_states, gen_targets, null_gen_target)
            out["gen_loss"] = generation_loss(out["gen_embeds"], gen_targets, cfg.gen_loss_type)
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
        """l_p targets: [IMG0] (and, as the original, the caption tokens); later [IMG] tokens and pads ignored."""
        slots = self.img_token_slots(ids)
        keep = self._mask(ids, lengths).bool() & (slots <= 0)
        if not self.config.lp_supervise_caption:
            keep &= slots == 0
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

    def _generation_inputs(self, voken_states, gen_targets, null_gen_target):
        """Mapper outputs for the N examples, with MiniGPT-5's CFG dropout applied to inputs and targets."""
        cfg = self.config
        expected = (voken_states.shape[0], cfg.num_gen_queries, cfg.gen_emb_dim)
        if tuple(gen_targets.shape) != expected:
            raise ValueError(f"gen_targets have shape {tuple(gen_targets.shape)}, expected {expected} "
                             f"(N, num_gen_queries, gen_emb_dim)")
        states = self.mapper_inputs(voken_states)
        gen_targets = gen_targets.to(states.dtype)
        if self.training and cfg.cfg_dropout_prob > 0:
            if null_gen_target is None:
                raise ValueError("cfg_dropout_prob > 0 needs null_gen_target (the text encoder's output for \"\")")
            drop = torch.rand(states.shape[0], device=states.device) < cfg.cfg_dropout_prob  # (N,)
            states = states.masked_fill(drop[:, None, None], 0.0)
            gen_targets = torch.where(drop[:, None, None], null_gen_target.to(gen_targets), gen_targets)
        return self.adapter.mapper(states), gen_targets

    @staticmethod
    def _lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Token-mean next-token cross-entropy (labels shifted here), computed in fp32."""
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=IGNORE_INDEX)
