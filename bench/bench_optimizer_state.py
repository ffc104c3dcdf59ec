"""Optimizer-state bytes: our trainable set vs the original's (which trains the whole tied embedding matrix).

Paper widths (OPT-6.7B, CLIP ViT-L/14, SD-1.5), computed from configs on the meta device; no weights are loaded.
AdamW keeps two moments per trainable value. Target: ours <= 1/4 of the original's.

    python bench/bench_optimizer_state.py
"""

from gill_hf.configuration_gill import gill_paper_config
from gill_hf.modeling_gill import count_adapter_parameters

ORIGINAL_VOCAB_ROWS = 50274  # OPT-6.7B's 50272 rows resized for <|image|> + [IMG0..7] (gill-as-coded.md §1.4)


def main():
    config = gill_paper_config()
    counts = count_adapter_parameters(config)
    ours = counts["total"] - counts["decision_head"]  # the decision head is fit later, in its own run
    e = config.llm_embed_dim
    original = ours - counts["img_embeddings"] + ORIGINAL_VOCAB_ROWS * e
    for precision, nbytes in (("fp32", 4), ("bf16 (the original's --precision bf16)", 2)):
        ours_b, orig_b = 2 * ours * nbytes, 2 * original * nbytes
        print(f"AdamW state, {precision}: ours {ours_b / 2**20:,.1f} MiB ({ours:,} values) vs original "
              f"{orig_b / 2**20:,.1f} MiB ({original:,} values) -> ratio {ours_b / orig_b:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
