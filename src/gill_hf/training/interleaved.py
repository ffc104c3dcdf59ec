"""Stage 2 (MiniGPT-5 "interleaved"): next-token loss over interleaved stories + voken features for the LDM loss."""

import torch

from ..losses import generation_loss
from ..modeling_gill import GILLForConditionalGeneration, GILLOutput


def cfg_drop_mask(n: int, prob: float, device) -> torch.Tensor:
    """``(n,)`` bool: which voken sequences CFG training replaces by the null (all-zero) features."""
    return torch.rand(n, device=device) < prob


class GILLForInterleavedTraining(GILLForConditionalGeneration):
    """GILL whose training objective (``forward(..., gill_objective=True)``) also takes interleaved batches with
    ``labels`` (stage 2).

    Load the stage-1 adapter with ``GILLForInterleavedTraining.from_pretrained(stage1_dir)``; what it saves loads
    back as a plain :class:`GILLForConditionalGeneration`. Without ``labels`` the stage-1 objective runs.
    """

    def gill_objective(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                       pixel_values: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                       gen_targets: torch.Tensor | None = None, null_gen_target: torch.Tensor | None = None,
                       pack: bool | None = None, gen_pooled_targets: torch.Tensor | None = None,
                       null_gen_pooled_target: torch.Tensor | None = None) -> GILLOutput:
        """Stage 2: ``input_ids``/``labels`` ``(B, T)`` (prompt labels -100), ``pixel_values`` ``(N_in, 3, H, W)`` of
        the context images in reading order. Returns ``img_token_loss`` = the LM loss (lambda_1 via
        ``img_token_loss_weight``), ``gen_embeds`` ``(n_blocks, L, D)`` per [IMG] block (CFG-dropped ones use the null
        features) and, when ``gen_targets`` ``(n_blocks, L, D)`` are given, ``gen_loss`` (lambda_3); layouts with a
        pooled vector (SDXL, SD3, Flux) take ``gen_pooled_targets`` ``(n_blocks, P)`` with them (and
        ``null_gen_pooled_target`` ``(P,)`` under CFG dropout): their own l_g term (the pooled head against them) is
        added to the sequence's, as in stage 1 (so it weighs as much as all L tokens together)."""
        if labels is None:
            return super().gill_objective(input_ids, attention_mask, pixel_values, gen_targets=gen_targets,
                                          null_gen_target=null_gen_target, pack=pack,
                                          gen_pooled_targets=gen_pooled_targets,
                                          null_gen_pooled_target=null_gen_pooled_target)
        if gen_targets is None and gen_pooled_targets is not None:
            raise ValueError("gen_pooled_targets go with gen_targets (the sequence targets of the same blocks)")
        cfg = self.config
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        image_features = self.encode_images(pixel_values) if pixel_values is not None else None
        logits, features, _ = self.run_language_model(self.embed_inputs(input_ids, image_features), attention_mask,
                                                      use_cache=False)
        text_loss = self._lm_loss(logits, labels)
        terms, out = [cfg.img_token_loss_weight * text_loss], {"img_token_loss": text_loss}
        rows, cols = self.img_block_positions(input_ids)
        if rows.shape[0]:
            voken = features[rows, cols] if cfg.voken_feature_position == "at_token" else features[rows, cols - 1]
            states = self.mapper_inputs(voken)  # (n_blocks, r, f)
            if gen_targets is not None:
                self._check_pooled_targets(states.shape[0], gen_pooled_targets)
            if self.training and cfg.cfg_dropout_prob > 0:
                drop = cfg_drop_mask(states.shape[0], cfg.cfg_dropout_prob, states.device)
                states = states.masked_fill(drop[:, None, None], 0.0)
                if gen_targets is not None:
                    if null_gen_target is None:
                        raise ValueError("cfg_dropout_prob > 0 with gen_targets needs null_gen_target")
                    gen_targets = torch.where(drop[:, None, None], null_gen_target.to(gen_targets), gen_targets)
                if gen_pooled_targets is not None:
                    if null_gen_pooled_target is None:
                        raise ValueError("cfg_dropout_prob > 0 with gen_pooled_targets needs null_gen_pooled_target")
                    gen_pooled_targets = torch.where(drop[:, None], null_gen_pooled_target.to(gen_pooled_targets),
                                                     gen_pooled_targets)
            out["img_hidden_states"] = voken
            out["gen_embeds"] = self.adapter.mapper(states)
            if gen_targets is not None:
                out["gen_loss"] = generation_loss(out["gen_embeds"], gen_targets, cfg.gen_loss_type)
                if gen_pooled_targets is not None:  # the pooled head's output, its own l_g term
                    pooled = self.gen_pooled_embeddings(out["gen_embeds"])[:, None]  # (n_blocks, 1, P)
                    out["gen_loss"] = out["gen_loss"] + generation_loss(pooled, gen_pooled_targets[:, None],
                                                                        cfg.gen_loss_type)
                terms.append(cfg.gen_loss_weight * out["gen_loss"])
        return GILLOutput(loss=torch.stack([t.float() for t in terms]).sum(), **out)
