"""The checks to run when a GPU is lent: one script, one ``device_checks.json`` (and a printed table) of what it saw.

    python bench/device_checks.py --out "$OUT"                                    # on the GPU machine
    python bench/device_checks.py --out /tmp/device-checks --device cpu --skip benches   # a CPU dry run

Each check is timed and recorded as ok (with what it measured), failed (with its error) or skipped (with why), so one
failure never costs the others. The backbones are the toy world's (shipped with the package, nothing downloaded):
  train-fp32 / train-bf16  ``train_gill`` with its defaults (bf16 autocast on where CUDA supports it) for --steps
                           steps on toy pairs with l_g, backbones in fp32 / bf16: losses finite, trainables
                           fp32 masters, seconds per step
  pipeline                 the trained model's ``GILLPipeline`` on the device: a forced generated answer and a
                           retrieved one, with the decision head's P(retrieve)
  offload                  ``enable_model_cpu_offload()``: the same generated image as the plain device run (max abs
                           pixel difference), peak GPU memory of each
  llm-4bit                 the toy LLM loaded 4-bit NF4 (``BitsAndBytesConfig``, needs bitsandbytes + CUDA) under GILL:
                           LLM weight bytes against bf16, and a caption's l_c against the bf16 model's
  benches                  bench_decode, bench_train_step, bench_index_search --skip-ivfpq on the device, each in a
                           subprocess with a timeout: the ratios they print
"""

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
import traceback

import torch

from gill_hf import GILLForConditionalGeneration, GILLPipeline, RetrievalIndex
from gill_hf.demo.quickstart import MAPPER, QuickstartSettings, make_target_stores, make_toy_data
from gill_hf.toy_world.backbones import toy_backbones
from gill_hf.training import CaptionImageDataset, train_gill

CHECKS = ("train-fp32", "train-bf16", "pipeline", "offload", "llm-4bit", "benches")
BENCHES = {"bench_decode.py": [], "bench_train_step.py": [], "bench_index_search.py": ["--skip-ivfpq"]}


def train(paths: dict, data, stores: dict, out: str, device: str, steps: int, dtype: torch.dtype
          ) -> tuple[dict, object]:
    """``train_gill`` defaults on the device; -> (measures, the trained model)."""
    torch.manual_seed(0)  # the same fresh adapter for both backbone dtypes
    model = GILLForConditionalGeneration.from_backbones(paths["llm"], paths["clip"], paths["sd"], dtype=dtype,
                                                        **MAPPER)
    trainer = train_gill(model, CaptionImageDataset(data.train_captions, data.train_images), out,
                         targets=stores["train"], max_steps=steps, per_device_train_batch_size=16, logging_steps=1,
                         report_to=[], save_strategy="no", disable_tqdm=True, use_cpu=device == "cpu")
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    masters = {p.dtype for p in model.parameters() if p.requires_grad}
    losses = {key: [entry[key] for entry in logs] for key in ("loss", "caption_loss", "gen_loss", "ret_loss")}
    if not all(math.isfinite(v) for values in losses.values() for v in values) or masters != {torch.float32}:
        raise AssertionError(f"losses {losses} / trainable dtypes {masters}")
    return {"mixed_precision": trainer.accelerator.mixed_precision, "backbone_dtype": str(dtype),
            "s_per_step": seconds / steps, "first_loss": losses["loss"][0], "last_loss": losses["loss"][-1]}, model


def pipeline(model, data, device: str) -> tuple[dict, GILLPipeline]:
    """A generated, a retrieved and a decided answer (one image each) from the trained model on the device."""
    index = RetrievalIndex.from_images(model.eval(), data.heldout_images, data.heldout_paths)
    pipe = GILLPipeline.from_gill(model, retrieval_index=index).to(device)
    pipe.set_progress_bar_config(disable=True)
    answers = {}
    for mode in ("generate", "retrieve", "auto"):
        out = pipe([data.heldout_captions[0]], decision=mode, force_image_after=0, max_images=1, max_new_tokens=8,
                   num_inference_steps=8, generator=torch.Generator(device).manual_seed(0))
        answers[mode] = [part if isinstance(part, str) else {"kind": part.kind, "path": part.path,
                                                             "decision": str(part.decision)} for part in out.parts]
        if not out.images:
            raise AssertionError(f"decision={mode}: no image in {answers[mode]}")
    return answers, pipe


def offload(pipe: GILLPipeline, data, device: str) -> dict:
    if torch.device(device).type != "cuda":
        raise SkipCheck("model CPU offload needs a CUDA device")

    def image():
        torch.cuda.reset_peak_memory_stats()
        out = pipe([data.heldout_captions[0]], decision="generate", force_image_after=0, max_images=1,
                   max_new_tokens=8, num_inference_steps=8, generator=torch.Generator(device).manual_seed(0),
                   output_type="pt")
        return torch.as_tensor(out.images[0]).float().cpu(), torch.cuda.max_memory_allocated()

    plain, plain_peak = image()
    pipe.enable_model_cpu_offload(device=device)
    offloaded, offload_peak = image()
    return {"max_abs_pixel_diff": (plain - offloaded).abs().max().item(), "peak_bytes_plain": plain_peak,
            "peak_bytes_offload": offload_peak}


def llm_4bit(paths: dict, data, device: str) -> dict:
    if torch.device(device).type != "cuda":
        raise SkipCheck("bitsandbytes 4-bit loads need a CUDA device")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise SkipCheck("bitsandbytes is not installed (pip install gill_hf[quantization-gpu])")
    from transformers import BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    models = {name: GILLForConditionalGeneration.from_backbones(
        paths["llm"], paths["clip"], paths["sd"], dtype=torch.bfloat16, device_map=device, **MAPPER, **extra)
        for name, extra in (("bf16", {}), ("nf4", {"quantization_config": config}))}
    batch = models["bf16"].processor.encode_captions(data.train_captions[:4], max_length=32)
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    labels = ids.masked_fill(mask == 0, -100)
    out = {}
    for name, model in models.items():
        with torch.no_grad():
            logits = model.language_model(input_ids=ids, attention_mask=mask).logits.float()
        out[name] = {"llm_weight_bytes": sum(p.numel() * p.element_size() for p in model.language_model.parameters()),
                     "caption_lm_loss": torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                                                          labels[:, 1:].flatten()).item()}
    out["weight_bytes_ratio"] = out["nf4"]["llm_weight_bytes"] / out["bf16"]["llm_weight_bytes"]
    return out


def benches(device: str, timeout_s: int) -> dict:
    folder, results = os.path.dirname(os.path.abspath(__file__)), {}
    for script, extra in BENCHES.items():
        try:
            run = subprocess.run([sys.executable, os.path.join(folder, script), "--device", device, *extra],
                                 capture_output=True, text=True, timeout=timeout_s, cwd=folder)
            lines = [line for line in run.stdout.splitlines() if line.strip()]
            results[script] = {"returncode": run.returncode, "stdout_tail": lines[-25:],
                               **({"stderr_tail": run.stderr.splitlines()[-10:]} if run.returncode else {})}
        except subprocess.TimeoutExpired:
            results[script] = {"timed_out_after_s": timeout_s}
    return results


class SkipCheck(Exception):
    """A check that does not apply on this machine (the reason is recorded)."""


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for device_checks.json and the working files")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=_positive, default=20)
    parser.add_argument("--skip", nargs="*", default=[], choices=CHECKS)
    parser.add_argument("--bench-timeout-s", type=int, default=150)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    report = {"device": args.device, "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else None,
              "checks": {}}
    paths = toy_backbones(os.path.join(args.out, "backbones"))
    data = make_toy_data(QuickstartSettings(train_size=128), os.path.join(args.out, "data"))
    stores = make_target_stores({"train": data.train_captions}, paths["sd"], args.out)
    state = {}
    steps = {
        "train-fp32": lambda: _keep(state, "model", *train(paths, data, stores, os.path.join(args.out, "t32"),
                                                           args.device, args.steps, torch.float32)),
        "train-bf16": lambda: train(paths, data, stores, os.path.join(args.out, "t16"), args.device, args.steps,
                                    torch.bfloat16)[0],
        "pipeline": lambda: _keep(state, "pipe", *pipeline(_needs(state, "model"), data, args.device)),
        "offload": lambda: offload(_needs(state, "pipe"), data, args.device),
        "llm-4bit": lambda: llm_4bit(paths, data, args.device),
        "benches": lambda: benches(args.device, args.bench_timeout_s),
    }
    for name, check in steps.items():
        start = time.perf_counter()
        if name in args.skip:
            entry = {"status": "skipped", "why": "--skip"}
        else:
            try:
                entry = {"status": "ok", "result": check()}
            except SkipCheck as why:
                entry = {"status": "skipped", "why": str(why)}
            except Exception as err:  # one failed check must not cost the others
                entry = {"status": "failed", "error": f"{type(err).__name__}: {err}",
                         "traceback": traceback.format_exc().splitlines()[-12:]}
        entry["seconds"] = round(time.perf_counter() - start, 1)
        report["checks"][name] = entry
        print(f"{name:>11}: {entry['status']:<7} {entry['seconds']:7.1f} s  "
              f"{json.dumps(entry.get('result', entry.get('why', entry.get('error'))), default=str)[:300]}",
              flush=True)
        with open(os.path.join(args.out, "device_checks.json"), "w") as handle:
            json.dump(report, handle, indent=1, default=str)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {text!r}")
    return int(text)


def _keep(state: dict, key: str, result: dict, value) -> dict:
    state[key] = value
    return result


def _needs(state: dict, key: str):
    if key not in state:
        raise SkipCheck(f"needs the {key} of an earlier check that did not run")
    return state[key]


if __name__ == "__main__":
    main()
