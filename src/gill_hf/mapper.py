"""Mappers f_omega from r [IMG] hidden states to the diffusion model's L x D text-conditioning space.

``gill_mapper`` is the paper's GILLMapper (Sec. 3.2, Fig. 4); ``linear``, ``mlp`` and ``transformer_encoder`` are
the Table 3 ablations. Every mapper takes ``(N, r, e)`` and returns ``(N, L, D)``.
"""

import warnings

import torch
from torch import nn

from .configuration_gill import GILLConfig


def _input_projection(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    if kind == "mlp":  # MiniGPT-5: Linear -> GELU -> Linear
        return nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
    return nn.Linear(in_dim, out_dim)


class GILLMapper(nn.Module):
    """Encoder-decoder transformer over the r [IMG] states with L learnt queries (paper Fig. 4)."""

    def __init__(self, config: GILLConfig, in_dim: int):
        super().__init__()
        d = config.mapper_hidden_dim
        self.in_proj = _input_projection(config.mapper_input_proj, in_dim, d)
        with warnings.catch_warnings():  # norm_first disables the nested-tensor fast path; harmless
            warnings.filterwarnings("ignore", message="enable_nested_tensor")
            self.transformer = nn.Transformer(
                d_model=d, nhead=config.mapper_num_heads, num_encoder_layers=config.mapper_encoder_layers,
                num_decoder_layers=config.mapper_decoder_layers, dim_feedforward=config.mapper_ffn_dim,
                dropout=config.mapper_dropout, batch_first=True, norm_first=True)
        self.queries = nn.Parameter(torch.randn(1, config.num_gen_queries, d))  # (1, L, d), std-1 as the original
        self.out_proj = nn.Linear(d, config.gen_emb_dim) if d != config.gen_emb_dim else nn.Identity()

    def forward(self, img_states: torch.Tensor) -> torch.Tensor:  # (N, r, e) -> (N, L, D)
        src = self.in_proj(img_states)  # (N, r, d)
        tgt = self.queries.expand(src.shape[0], -1, -1).to(src.dtype)  # (N, L, d)
        return self.out_proj(self.transformer(src=src, tgt=tgt))


class TokenMixMapper(nn.Module):
    """Table 3 ``linear`` / ``mlp`` baselines: per-token map e -> D, then a linear mix of the r tokens into L."""

    def __init__(self, config: GILLConfig, in_dim: int):
        super().__init__()
        if config.mapper_type == "linear":
            self.token_proj = nn.Linear(in_dim, config.gen_emb_dim)
        else:
            d = config.mapper_hidden_dim
            self.token_proj = nn.Sequential(nn.Linear(in_dim, d), nn.LeakyReLU(), nn.Linear(d, config.gen_emb_dim))
        self.token_mix = nn.Linear(config.num_img_tokens, config.num_gen_queries)

    def forward(self, img_states: torch.Tensor) -> torch.Tensor:  # (N, r, e) -> (N, L, D)
        per_token = self.token_proj(img_states)  # (N, r, D)
        return self.token_mix(per_token.transpose(1, 2)).transpose(1, 2)


class EncoderOnlyMapper(nn.Module):
    """Table 3 ``transformer_encoder`` baseline: a bidirectional encoder over [r states ; L queries], keep the L."""

    def __init__(self, config: GILLConfig, in_dim: int):
        super().__init__()
        d = config.mapper_hidden_dim
        self.in_proj = _input_projection(config.mapper_input_proj, in_dim, d)
        layer = nn.TransformerEncoderLayer(d, config.mapper_num_heads, config.mapper_ffn_dim,
                                           config.mapper_dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, max(config.mapper_encoder_layers, 1), norm=nn.LayerNorm(d),
                                             enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(1, config.num_gen_queries, d))
        self.out_proj = nn.Linear(d, config.gen_emb_dim)

    def forward(self, img_states: torch.Tensor) -> torch.Tensor:  # (N, r, e) -> (N, L, D)
        src = self.in_proj(img_states)
        queries = self.queries.expand(src.shape[0], -1, -1).to(src.dtype)
        encoded = self.encoder(torch.cat([src, queries], dim=1))  # (N, r + L, d)
        return self.out_proj(encoded[:, src.shape[1]:])


class PooledHead(nn.Module):
    """The pooled text vector of layouts that need one (SDXL, SD3, Flux): a linear map of the mean of the L mapper
    outputs."""

    def __init__(self, config: GILLConfig):
        super().__init__()
        self.proj = nn.Linear(config.gen_emb_dim, config.gen_pooled_dim)

    def forward(self, gen_embeds: torch.Tensor) -> torch.Tensor:  # (N, L, D) -> (N, P)
        return self.proj(gen_embeds.mean(dim=1))


def build_mapper(config: GILLConfig, in_dim: int) -> nn.Module:
    """The mapper named by ``config.mapper_type``."""
    if config.mapper_type == "gill_mapper":
        return GILLMapper(config, in_dim)
    if config.mapper_type == "transformer_encoder":
        return EncoderOnlyMapper(config, in_dim)
    return TokenMixMapper(config, in_dim)
