"""Training step: our single pass (1 CLIP + 2 LLM passes) vs the original's (2 CLIP + 3 LLM passes), same weights.

The original GILL runs captioning, retrieval and generation as three model calls per step, each with its own LLM
pass (the last two on identical text-only inputs) and the first two each encoding the images with CLIP; we run the
text-only pass once for l_p, l_r and l_g and CLIP once. Both variants are built here from the same model's
building blocks, on one batch, and each step includes backward and an AdamW update of the adapter.

    python bench/bench_train_step.py                     # CPU, random mid-size backbones built locally
    python bench/bench_train_step.py --device cuda --llm-width 2048 --llm-layers 16 --batch-size 32

Prints samples/s of both (from the median step time) and the ratio (target >= 1.4x), and peak memory of both (CUDA: max allocated; CPU: peak
RSS above the pre-step RSS, each variant in its own process).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from gill_hf import GILLForConditionalGeneration
from gill_hf.losses import contrastive_loss, generation_loss
from gill_hf.tiny import build_tiny_tokenizer


def build_backbones(root: str, llm_width: int, llm_layers: int, clip_width: int, image_size: int) -> dict:
    """Random OPT (tied) + CLIP vision checkpoints of the given sizes, saved under ``root`` (reused if present)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    paths = {"llm": os.path.join(root, f"opt-{llm_width}x{llm_layers}"),
             "clip": os.path.join(root, f"clip-{clip_width}-{image_size}")}
    if not os.path.exists(os.path.join(paths["llm"], "config.json")):
        torch.manual_seed(0)
        tokenizer = build_tiny_tokenizer()
        OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), hidden_size=llm_width, num_hidden_layers=llm_layers,
                                 ffn_dim=4 * llm_width, num_attention_heads=max(1, llm_width // 64),
                                 word_embed_proj_dim=llm_width, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                 dropout=0.0, attention_dropout=0.0)).save_pretrained(paths["llm"])
        tokenizer.save_pretrained(paths["llm"])
    if not os.path.exists(os.path.join(paths["clip"], "config.json")):
        torch.manual_seed(0)
        CLIPVisionModel(CLIPVisionConfig(hidden_size=clip_width, intermediate_size=4 * clip_width,
                                         num_hidden_layers=4, num_attention_heads=max(1, clip_width // 64),
                                         image_size=image_size, patch_size=image_size // 8)
                        ).save_pretrained(paths["clip"])
        CLIPImageProcessorPil(size={"shortest_edge": image_size},
                              crop_size={"height": image_size, "width": image_size}).save_pretrained(paths["clip"])
    return paths


def make_batch(model, batch_size: int, seed: int = 0) -> dict:
    """Toy captions (padded to 32 tokens like the original), random images and random 77 x D targets."""
    g = torch.Generator().manual_seed(seed)
    words = "a red green blue circle square triangle on the left right top bottom of my dog cat photo".split()
    captions = [" ".join(words[int(i)] for i in torch.randint(len(words), (20,), generator=g))
                for _ in range(batch_size)]
    enc = model.processor.encode_captions(captions, max_length=32)
    size = model.vision_model.config.image_size
    cfg = model.config
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values": torch.randn(batch_size, 3, size, size, generator=g),
            "gen_targets": torch.randn(batch_size, cfg.num_gen_queries, cfg.gen_emb_dim, generator=g)}


def ours_loss(model, batch) -> torch.Tensor:
    return model(**batch, gill_objective=True, pack=False).loss


def original_loss(model, batch) -> torch.Tensor:
    """The original's three-call step: captioning (CLIP #1, LLM #1), retrieval (CLIP #2, LLM #2), generation (LLM #3);
    l_p from the two text-only passes, each weighted 0.5."""
    ids, mask, px = batch["input_ids"], batch["attention_mask"], batch["pixel_values"]
    lengths = mask.sum(1)
    pad_id = model.language_model.config.pad_token_id or 0
    caption = model._caption_loss(ids, lengths, model.encode_images(px), pad_id, False)  # CLIP 1, LLM 1
    rows, cols = model.img_block_positions(ids)
    labels = model._img_token_labels(ids, lengths)
    logits, features, _ = model.run_language_model(model.embed_tokens(ids), mask, use_cache=False)  # LLM 2
    lp_ret = model._lm_loss(logits, labels)
    ret = contrastive_loss(model.text_retrieval_embeddings(features[rows, cols][:, 0]),
                           model.image_retrieval_embeddings(model.encode_images(px)),  # CLIP 2
                           model.adapter.logit_scale)
    logits, features, _ = model.run_language_model(model.embed_tokens(ids), mask, use_cache=False)  # LLM 3
    lp_gen = model._lm_loss(logits, labels)
    gen = generation_loss(model.gen_embeddings(features[rows, cols]), batch["gen_targets"], model.config.gen_loss_type)
    return caption + 0.5 * lp_ret + 0.5 * lp_gen + ret + gen


VARIANTS = {"ours": ours_loss, "original": original_loss}


def build(args):
    paths = build_backbones(args.cache, args.llm_width, args.llm_layers, args.clip_width, args.image_size)
    torch.manual_seed(0)
    model = GILLForConditionalGeneration.from_backbones(
        paths["llm"], paths["clip"], None, gen_emb_dim=768, mapper_hidden_dim=256, mapper_num_heads=4,
        mapper_ffn_dim=1024, mapper_encoder_layers=2, mapper_decoder_layers=2).to(args.device).train()
    batch = {k: v.to(args.device) for k, v in make_batch(model, args.batch_size).items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, batch, optimizer


def step(model, batch, optimizer, loss_fn):
    with torch.autocast(batch["pixel_values"].device.type, dtype=torch.bfloat16,
                        enabled=batch["pixel_values"].is_cuda):
        loss = loss_fn(model, batch)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_variants(args) -> dict:
    """Samples/s of both variants from the median step time; steps alternate between the variants so load from
    other processes hits both alike, and the median ignores steps slowed by such load."""
    model, batch, optimizer = build(args)
    start_state = {k: v.clone() for k, v in model.adapter.state_dict().items()}
    times = {name: [] for name in VARIANTS}
    for i in range(args.warmup + args.steps):
        for name, loss_fn in VARIANTS.items():
            model.adapter.load_state_dict(start_state)  # same weights for every timed step
            sync(args.device)
            t0 = time.perf_counter()
            step(model, batch, optimizer, loss_fn)
            sync(args.device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: args.batch_size / statistics.median(seconds) for name, seconds in times.items()}


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(args, variant: str) -> float:
    """MiB above the memory in use before the steps: CUDA max allocated during two steps, or on CPU the peak of
    the RSS sampled every millisecond by a background thread."""
    model, batch, optimizer = build(args)
    loss_fn = VARIANTS[variant]
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(2):
            step(model, batch, optimizer, loss_fn)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    base, peak, done = current_rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], current_rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample)
    sampler.start()
    for _ in range(2):
        step(model, batch, optimizer, loss_fn)
    done.set()
    sampler.join()
    return (peak[0] - base) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--llm-width", type=int, default=768)
    parser.add_argument("--llm-layers", type=int, default=6)
    parser.add_argument("--clip-width", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "gill-bench-backbones"))
    parser.add_argument("--memory-of", choices=list(VARIANTS), help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_of:
        print(json.dumps({"mib": peak_memory(args, args.memory_of)}))
        return
    speed = time_variants(args)
    memory = {}
    for name in VARIANTS:  # a fresh process each, so one variant's peak cannot hide the other's
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--memory-of", name], check=True,
                             capture_output=True, text=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])["mib"]
    print(f"device {args.device}, batch {args.batch_size}, LLM {args.llm_width}x{args.llm_layers}, "
          f"CLIP {args.clip_width} @ {args.image_size}px, {args.steps} timed steps each")
    for name in VARIANTS:
        print(f"  {name:<9} {speed[name]:8.2f} samples/s   peak memory {memory[name]:9.1f} MiB")
    print(f"speed-up ours / original: {speed['ours'] / speed['original']:.2f}x (target >= 1.4x); "
          f"memory ours / original: {memory['ours'] / memory['original']:.2f}")


if __name__ == "__main__":
    main()
