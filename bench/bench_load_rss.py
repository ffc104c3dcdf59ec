"""Peak RSS of ``GILLForConditionalGeneration.from_pretrained(..., dtype=torch.bfloat16)`` on a wide local LLM.

Writes (once) an OPT with ~0.6B parameters (>= 1 GB of bf16 weights) plus a GILL adapter folder pointing at it, then
loads it in a fresh process and compares the peak resident-memory growth with the weight bytes. Target: <= 1.3x
(the original materialised the LLM in fp32 first: >= 2x).

    python bench/bench_load_rss.py [--workdir /tmp/gill-bench-rss]
"""

import argparse
import json
import os
import subprocess
import sys

LOAD_SNIPPET = r"""
import json, resource, sys, threading, time, torch
from gill_hf import GILLForConditionalGeneration
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field))
peak_anon, done = [status_kib("RssAnon:")], threading.Event()
def sample():  # anonymous (allocated) memory, every 5 ms; file-backed mmap pages are page cache
    while not done.is_set():
        peak_anon.append(status_kib("RssAnon:")); time.sleep(0.005)
before, before_anon = status_kib("VmRSS:"), status_kib("RssAnon:")
sampler = threading.Thread(target=sample); sampler.start()
model = GILLForConditionalGeneration.from_pretrained(sys.argv[1], dtype=torch.bfloat16)
done.set(); sampler.join()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = sum(p.numel() * p.element_size() for p in model.language_model.parameters())
print(json.dumps({"before_kib": before, "peak_kib": peak, "before_anon_kib": before_anon,
                  "peak_anon_kib": max(peak_anon), "llm_weight_bytes": weights}))
"""


def build(workdir: str) -> str:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from gill_hf import GILLForConditionalGeneration, build_tiny_backbones

    adapter_dir = os.path.join(workdir, "gill-adapter")
    if os.path.exists(os.path.join(adapter_dir, "model.safetensors")):
        return adapter_dir
    tiny = build_tiny_backbones(os.path.join(workdir, "tiny"))
    llm_dir = os.path.join(workdir, "wide-opt")
    config = OPTConfig(vocab_size=50272, hidden_size=2048, ffn_dim=8192, num_hidden_layers=10,
                       num_attention_heads=16, word_embed_proj_dim=2048, max_position_embeddings=2048,
                       pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device("cpu"):
        OPTForCausalLM(config).to(torch.bfloat16).save_pretrained(llm_dir)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny["opt"]).save_pretrained(llm_dir)
    model = GILLForConditionalGeneration.from_backbones(llm_dir, tiny["clip"], tiny["sd"], dtype=torch.bfloat16)
    model.save_pretrained(adapter_dir)
    return adapter_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/gill-bench-rss")
    args = parser.parse_args()
    adapter_dir = build(args.workdir)
    result = json.loads(subprocess.run([sys.executable, "-c", LOAD_SNIPPET, adapter_dir], check=True,
                                       capture_output=True, text=True).stdout.strip().splitlines()[-1])
    growth = (result["peak_kib"] - result["before_kib"]) * 1024
    anon = (result["peak_anon_kib"] - result["before_anon_kib"]) * 1024
    weights = result["llm_weight_bytes"]
    print(f"LLM bf16 weights: {weights / 2**30:.2f} GiB")
    print(f"peak anonymous (allocated) memory growth: {anon / 2**30:.2f} GiB -> ratio {anon / weights:.2f} "
          f"(target <= 1.3)")
    print(f"peak total RSS growth, incl. the mmap-ed safetensors pages: {growth / 2**30:.2f} GiB -> ratio "
          f"{growth / weights:.2f}")


if __name__ == "__main__":
    main()
