"""Decode speed of ``GILLForConditionalGeneration.generate`` (transformers' GenerationMixin), one run, same weights.

Prompt of VIST length (5 captions + 4 images, as the paper's VIST evaluation feeds), 32 new tokens, greedy:

1. text only: gill_hf's ``generate`` vs the bare LLM's own ``generate`` on the same prompt (as ``inputs_embeds``)
   and new-token count (target: within 1.15x);
2. with one image (12 text tokens, the [IMG0..7] block, 12 text tokens): gill_hf vs the original GILL's uncached
   loop, which re-runs the whole sequence with ``use_cache=False`` and all hidden states every step, keeps the last
   layer's states of every step, moves the logits to the CPU and appends the 8 [IMG] embeddings in one step when
   [IMG0] is chosen (target >= 5x). Both must produce the same tokens and [IMG] states; the script checks it;
3. the [IMG]-block cost: r forced decode steps (what GenerationMixin runs) vs one cached forward of the r tokens.

    python bench/bench_decode.py                 # random OPT-125m-shaped LLM (vocab 50272), tiny CLIP
    python bench/bench_decode.py --preset opt-350m-width --device cuda
"""

import argparse
import copy
import tempfile
import time

import torch
from PIL import Image

from gill_hf import GILLForConditionalGeneration, build_tiny_backbones

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


def timed(device, fn, repeats: int = 3):
    """Best wall time of ``repeats`` calls (s) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best, result


@torch.no_grad()
def block_costs(model, embeds, mask, device):
    """Seconds for the r [IMG] tokens as r one-token cached steps vs one cached forward of all r."""
    r, img = model.config.num_img_tokens, model.img_token_ids.unsqueeze(0)
    prefill = model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=True)

    def fresh_cache():
        return copy.deepcopy(prefill.cache)

    def stepwise():
        cache, m = fresh_cache(), mask
        for i in range(r):
            m = torch.cat([m, m[:, :1]], dim=1)
            model(input_ids=img[:, i:i + 1], attention_mask=m, cache=cache, use_cache=True, logits_to_keep=1)

    def one_forward():
        cache = fresh_cache()
        model(input_ids=img, attention_mask=torch.cat([mask, mask[:, :1].expand(-1, r)], 1), cache=cache,
              use_cache=True, logits_to_keep=1)

    copy_s, _ = timed(device, fresh_cache)
    steps_s, _ = timed(device, stepwise)
    one_s, _ = timed(device, one_forward)
    return steps_s - copy_s, one_s - copy_s


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="opt-125m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every loop (1 avoids OpenMP stalls on a loaded machine)")
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
        enc = model.processor([prompt], padding_side="left").to(args.device)
        input_ids, mask, pixels = enc["input_ids"], enc["attention_mask"], enc["pixel_values"]
        with torch.no_grad():
            embeds = model.embed_inputs(input_ids, model.encode_images(pixels))
        fixed = dict(max_new_tokens=NEW_TOKENS, eos_token_id=None, do_sample=False)
        model.generate(**enc, **{**fixed, "max_new_tokens": 2})  # warm-up

        gill_text_s, gill_text = timed(args.device, lambda: model.generate(**enc, **fixed))
        bare_s, bare = timed(args.device, lambda: model.language_model.generate(
            inputs_embeds=embeds, attention_mask=mask, **fixed))
        with_image = dict(fixed, force_image_after=TEXT_BEFORE_IMAGE, max_images=1, return_dict_in_generate=True)
        gill_image_s, cached = timed(args.device, lambda: model.generate(**enc, **with_image))
        original_s, (original_ids, original_states) = timed(
            args.device, lambda: original_style_decode(model, input_ids, pixels), repeats=1)
        steps_s, one_s = block_costs(model, embeds, mask, args.device)

    same_tokens = cached.new_tokens[0].tolist() == original_ids
    slot = cached.images[0][0]
    max_diff = (slot.hidden_states.float() - original_states.float()).abs().max().item()
    print(f"preset {args.preset} on {args.device} ({args.dtype}, {torch.get_num_threads()} threads); prompt "
          f"{input_ids.shape[1]} tokens (5 captions + 4 images x {model.config.num_visual_tokens}), {NEW_TOKENS} "
          f"new tokens, greedy")
    print(f"text only: gill_hf generate {gill_text_s:.3f} s vs bare LLM generate {bare_s:.3f} s -> "
          f"{gill_text_s / bare_s:.3f}x (target <= 1.15x); both {gill_text.shape[1] - input_ids.shape[1]} / "
          f"{bare.shape[1]} new tokens")
    print(f"one image: same tokens as the original loop: {same_tokens}; max |[IMG] state difference|: {max_diff:.2e}")
    print(f"one image: gill_hf {gill_image_s:.3f} s ({NEW_TOKENS / gill_image_s:.1f} tokens/s) vs original uncached "
          f"{original_s:.3f} s ({NEW_TOKENS / original_s:.1f} tokens/s) -> speed-up {original_s / gill_image_s:.2f}x "
          f"(target >= 5x)")
    print(f"[IMG] block: {model.config.num_img_tokens} cached steps {steps_s * 1e3:.1f} ms vs one forward "
          f"{one_s * 1e3:.1f} ms -> {steps_s / one_s:.2f}x")


if __name__ == "__main__":
    main()
