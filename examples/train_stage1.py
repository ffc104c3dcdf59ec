"""GILL stage 1 on image-caption pairs with the HF Trainer; the same script runs on one or many processes.

    # one process (tiny random backbones + generated toy data, CPU, seconds):
    python examples/train_stage1.py --tiny /tmp/gill-tiny --output-dir /tmp/gill-run --max-steps 20 --cpu
    # two processes, same code (DDP; add --cpu for gloo on CPU):
    torchrun --nproc_per_node 2 examples/train_stage1.py --tiny /tmp/gill-tiny --output-dir /tmp/gill-run2 --cpu
    accelerate launch --num_processes 2 --cpu examples/train_stage1.py --tiny /tmp/gill-tiny --output-dir ... --cpu
    # real backbones and CC3M (targets from `gill-hf precompute-targets cc3m.tsv targets/ --diffusion-model ...`):
    torchrun --nproc_per_node 8 examples/train_stage1.py --tsv cc3m.tsv --targets targets/ --output-dir runs/gill

Writes the adapter (``save_pretrained``) and ``log_history.json`` to ``--output-dir``.
"""

import argparse
import json
import os

import torch

from gill_hf import GILLForConditionalGeneration, build_tiny_backbones
from gill_hf.training import CaptionImageDataset, DiffusionTextEncoder, TargetStore, precompute_targets, train_gill
from gill_hf.toy_world import write_toy_cc3m

TINY_MAPPER = dict(mapper_hidden_dim=32, mapper_num_heads=4, mapper_ffn_dim=64, mapper_encoder_layers=2,
                   mapper_decoder_layers=2)


def tiny_setup(root: str, num_pairs: int) -> tuple[dict, str, str]:
    """Tiny backbones, a toy TSV and its target store under ``root`` (built once; later calls reuse them)."""
    backbones = build_tiny_backbones(os.path.join(root, "backbones"))
    data = os.path.join(root, f"toy-{num_pairs}")
    tsv = os.path.join(data, "train.tsv")
    if not os.path.exists(tsv):
        write_toy_cc3m(data, num_pairs)
    targets = os.path.join(data, "targets")
    captions = CaptionImageDataset.from_tsv(tsv).captions
    precompute_targets(captions, targets, DiffusionTextEncoder(backbones["sd"]), dtype="float32", progress=False)
    return backbones, tsv, targets


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", metavar="DIR", help="use tiny random backbones and toy data built under DIR")
    parser.add_argument("--text-model", default="facebook/opt-6.7b")
    parser.add_argument("--vision-model", default="openai/clip-vit-large-patch14")
    parser.add_argument("--diffusion-model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
    parser.add_argument("--tsv", help="caption<TAB>image training TSV")
    parser.add_argument("--targets", help="target store from `gill-hf precompute-targets`")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=2, help="per process")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--pack-prob", type=float, default=0.5)
    parser.add_argument("--cpu", action="store_true", help="train on CPU (gloo backend when distributed)")
    args = parser.parse_args()

    model_kwargs = {"pack_prob": args.pack_prob}
    if args.tiny:
        backbones, tsv, targets = tiny_setup(args.tiny, num_pairs=16)
        text, vision, diffusion = backbones["opt"], backbones["clip"], backbones["sd"]
        model_kwargs.update(TINY_MAPPER)
    else:
        tsv, targets = args.tsv, args.targets
        text, vision, diffusion = args.text_model, args.vision_model, args.diffusion_model
    torch.manual_seed(0)  # identical initial adapters on every process
    model = GILLForConditionalGeneration.from_backbones(text, vision, diffusion, **model_kwargs)
    dataset = CaptionImageDataset.from_tsv(tsv)
    trainer = train_gill(model, dataset, args.output_dir, targets=TargetStore(targets) if targets else None,
                         max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
                         learning_rate=args.learning_rate, logging_steps=1, seed=0, disable_tqdm=True,
                         use_cpu=args.cpu)
    trainer.train()
    trainer.save_model()
    if trainer.is_world_process_zero():
        with open(os.path.join(args.output_dir, "log_history.json"), "w") as f:
            json.dump(trainer.state.log_history, f, indent=1)
    if torch.distributed.is_initialized():  # tear gloo / NCCL down before exit on every rank
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
