"""Decode speed: gill_hf's KV-cached loop vs the original GILL's uncached loop, same weights, one run.

Prompt of VIST length (5 captions + 4 images, as the paper's VIST evaluation feeds), 32 new tokens with one image
(12 text tokens, the [IMG0..7] block, 12 text tokens), greedy. The uncached loop behaves like the original
``GILLModel.generate``: every step re-runs the whole sequence with ``use_cache=False`` and all hidden states,
keeps the last layer's states of every step, moves the logits to the CPU, and appends the 8 [IMG] embeddings in
one step when [IMG0] is chosen. Both loops must produce the same tokens and [IMG] states; the script checks it.

    python bench/bench_decode.py                 # random OPT-125m-shaped LLM (vocab 50272), tiny CLIP
    python bench/bench_decode.py --preset opt-350m --device cuda

Prints tokens/s of both and their ratio (target >= 5x).
"""

import argparse
import tempfile
import time

import torch
from PIL import Image

from gill_hf import GILLForConditionalGeneration, build_tiny_backbones, generate_interleaved

PRESETS = {  # OPT shapes with random weights (no download); vocab as the real OPT
    "tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4, vocab_size=None),
    "opt-125m": dict(hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, vocab_size=50272),
    "opt-350m-width": dict(hidden_size=1024, num_hidden_layers=24, ffn_dim=4096, num_attention_heads=16,
                           vocab_size=50272),
}
CAPTIONS = [
    "we went to the beach with my dog and the sun was big and yellow in the sky .",
    "then we saw a man and a child at the park next to a tree with red flowers .",
    "after that the people had fun in the water and the dog went to the city .",
    "the bus and the train were at the station in the middle of the city at night .",
    "finally we went to the house and had fun with the cat on the big white car .",
]
TEXT_BEFORE_IMAGE, NEW_TOKENS = 12, 32


def build_model(preset: str, workdir: str, device: str, dtype: torch.dtype) -> GILLForConditionalGeneration:
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    paths = build_tiny_backbones(workdir)
    llm_path = paths["opt"]
    shape = PRESETS[preset]
    if shape["vocab_size"] is not None:
        tokenizer = AutoTokenizer.from_pretrained(paths["opt"])
        torch.manual_seed(0)
        config = OPTConfig(**shape, max_position_embeddings=2048, word_embed_proj_dim=shape["hidden_size"],
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
        llm_path = f"{workdir}/{preset}"
        OPTForCausalLM(config).save_pretrained(llm_path)
        tokenizer.save_pretrained(llm_path)
    torch.manual_seed(0)
    model = GILLForConditionalGeneration.from_backbones(llm_path, paths["clip"], paths["sd"], dtype=dtype)
    return model.to(device).eval()


@torch.no_grad()
def original_style_decode(model, input_ids, pixel_values):
    """The original's loop (behaviour only): full recompute per step, no EOS, forced [IMG] block at batch 1."""
    embeds = model.embed_inputs(input_ids, model.encode_images(pixel_values))
    mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
    img_ids = model.img_token_ids
    new_ids, kept_states, step = [], [], 0
    while len(new_ids) < NEW_TOKENS:
        out = model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False,
                                   output_hidden_states=True)  # LM head over every position, as the original
        kept_states.append(out.hidden_states[-1])  # the original keeps every step's last-layer states
        last = model.full_logits(out.logits[:, -1:], out.hidden_states[-1][:, -1:])[:, -1].cpu()  # + [IMG] rows
        last[:, img_ids[1:].cpu()] = float("-inf")
        if step == TEXT_BEFORE_IMAGE:  # the original forces it with gen_scale_factor; same effect here
            block = img_ids.unsqueeze(0)
        else:
            last[:, img_ids[0].cpu()] = float("-inf")
            block = last.argmax(-1, keepdim=True).to(embeds.device)
        new_ids.extend(block[0].tolist())
        embeds = torch.cat([embeds, model.embed_tokens(block)], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        step += 1
    # one more forward so the states at the last generated tokens exist, as the original needs
    _, features, _ = model.run_language_model(embeds, mask, use_cache=False)
    start = input_ids.shape[1] + TEXT_BEFORE_IMAGE
    return new_ids, features[0, start:start + model.config.num_img_tokens]


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="opt-125m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for both loops (1 avoids OpenMP stalls on a loaded machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as workdir:
        model = build_model(args.preset, workdir, args.device, getattr(torch, args.dtype))
        prompt = []
        for i, caption in enumerate(CAPTIONS):
            prompt.append(caption)
            if i < 4:
                prompt.append(Image.new("RGB", (64, 64), ("red", "blue", "green", "white")[i]))
        enc = model.processor([prompt], padding_side="left")
        input_ids, mask = enc["input_ids"].to(args.device), enc["attention_mask"].to(args.device)
        pixels = enc["pixel_values"].to(args.device)
        kwargs = dict(max_new_tokens=NEW_TOKENS, force_image_after=TEXT_BEFORE_IMAGE, max_images=1,
                      eos_token_id=[])
        generate_interleaved(model, input_ids, mask, pixels, **{**kwargs, "max_new_tokens": 2})  # warm-up

        _sync(args.device)
        start = time.perf_counter()
        cached = generate_interleaved(model, input_ids, mask, pixels, **kwargs)
        _sync(args.device)
        cached_s = time.perf_counter() - start

        start = time.perf_counter()
        original_ids, original_states = original_style_decode(model, input_ids, pixels)
        _sync(args.device)
        original_s = time.perf_counter() - start

    same_tokens = cached.sequences[0].tolist() == original_ids
    slot = cached.images[0][0]
    max_diff = (slot.hidden_states.float() - original_states.float()).abs().max().item()
    print(f"preset {args.preset} on {args.device} ({args.dtype}, {torch.get_num_threads()} threads); prompt {input_ids.shape[1]} tokens "
          f"(5 captions + 4 images x {model.config.num_visual_tokens}), {NEW_TOKENS} new tokens incl. 1 image")
    print(f"same tokens: {same_tokens}; max |[IMG] state difference|: {max_diff:.2e}")
    print(f"cached (gill_hf):   {cached_s:8.3f} s  {NEW_TOKENS / cached_s:9.1f} tokens/s")
    print(f"uncached (original): {original_s:8.3f} s  {NEW_TOKENS / original_s:9.1f} tokens/s")
    print(f"speed-up: {original_s / cached_s:.2f}x (target >= 5x)")


if __name__ == "__main__":
    main()
