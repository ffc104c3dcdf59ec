"""LLM weight bytes and peak resident memory of a torchao int8 weight-only load vs a bf16 load, as ratios.

Writes (once) a bf16 OPT with ~0.16B parameters (12 layers x 1024 wide, 8k vocabulary: the linear layers hold ~95% of
the weights, as in OPT-6.7B) and loads it in a fresh process per setting, the way
``GILLForConditionalGeneration.from_pretrained(..., dtype=torch.bfloat16, quantization_config=...)`` loads its LLM.
Peak = growth of resident memory during the load (VmRSS, sampled every 5 ms; the anonymous part alone is printed
too: a bf16 load keeps its weights as file-backed mmap pages, a quantized load allocates them). Goal: <= 0.55x.

    python bench/bench_quantized_load.py [--workdir /tmp/gill-bench-quant]

On a CUDA machine with bitsandbytes installed, ``--bnb`` adds a 4-bit NF4 load (``BitsAndBytesConfig``) on the GPU.
"""

import argparse
import json
import os
import subprocess
import sys

LOAD_SNIPPET = r"""
import json, sys, threading, time, torch
from transformers import AutoModelForCausalLM
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field))
def tensor_bytes(t):
    if hasattr(t, "__tensor_flatten__"):  # torchao / bnb tensor subclasses: their inner tensors
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()
mode = sys.argv[2]
kwargs = {"dtype": torch.bfloat16}
if mode == "int8":
    from torchao.quantization import Int8WeightOnlyConfig
    from transformers import TorchAoConfig
    kwargs["quantization_config"] = TorchAoConfig(Int8WeightOnlyConfig())
elif mode == "bnb4":
    from transformers import BitsAndBytesConfig
    kwargs.update(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                         bnb_4bit_compute_dtype=torch.bfloat16), device_map="cuda")
peak, peak_total, done = [status_kib("RssAnon:")], [status_kib("VmRSS:")], threading.Event()
def sample():
    while not done.is_set():
        peak.append(status_kib("RssAnon:")); peak_total.append(status_kib("VmRSS:")); time.sleep(0.005)
before, before_total = status_kib("RssAnon:"), status_kib("VmRSS:")
sampler = threading.Thread(target=sample); sampler.start()
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], **kwargs)
done.set(); sampler.join()
weights = sum(tensor_bytes(p) for p in model.parameters())
x = torch.randint(0, 8000, (1, 8), device=model.device)
with torch.no_grad():
    assert torch.isfinite(model(x).logits.float()).all()
print(json.dumps({"peak_growth_kib": max(peak) - before, "peak_total_growth_kib": max(peak_total) - before_total,
                  "llm_weight_bytes": weights}))
"""


def build(workdir: str) -> str:
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    path = os.path.join(workdir, "opt-160m-bf16")
    if not os.path.exists(os.path.join(path, "config.json")):
        config = OPTConfig(vocab_size=8192, hidden_size=1024, ffn_dim=4096, num_hidden_layers=12,
                           num_attention_heads=16, word_embed_proj_dim=1024, max_position_embeddings=256)
        torch.manual_seed(0)
        OPTForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def measure(path: str, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", LOAD_SNIPPET, path, mode], check=True, capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/gill-bench-quant")
    parser.add_argument("--bnb", action="store_true", help="also a bitsandbytes 4-bit load (CUDA)")
    args = parser.parse_args(argv)
    os.makedirs(args.workdir, exist_ok=True)
    path = build(args.workdir)
    base = measure(path, "bf16")
    modes = ["int8"] + (["bnb4"] if args.bnb else [])
    print(f"bf16 load: LLM weights {base['llm_weight_bytes'] / 2**20:.1f} MiB, "
          f"peak RSS growth {base['peak_total_growth_kib'] / 1024:.1f} MiB (anonymous {base['peak_growth_kib'] / 1024:.1f})")
    for mode in modes:
        result = measure(path, mode)
        print(f"{mode} load: LLM weights {result['llm_weight_bytes'] / 2**20:.1f} MiB "
              f"({result['llm_weight_bytes'] / base['llm_weight_bytes']:.2f}x bf16), peak RSS growth "
              f"{result['peak_total_growth_kib'] / 1024:.1f} MiB "
              f"({result['peak_total_growth_kib'] / base['peak_total_growth_kib']:.2f}x bf16; anonymous "
              f"{result['peak_growth_kib'] / base['peak_growth_kib']:.2f}x)")


if __name__ == "__main__":
    main()
