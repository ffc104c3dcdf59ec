"""``gill-hf tiny-backbones OUT_DIR``: write the tiny offline OPT / Llama / CLIP / Stable Diffusion checkpoints."""

import json

from . import output_path


def run(args) -> int:
    from ..tiny import build_tiny_backbones

    out_dir = output_path(args.out_dir, "out_dir", "folder")
    print(json.dumps(build_tiny_backbones(out_dir, seed=args.seed), indent=2))
    return 0


def register(subparsers):
    parser = subparsers.add_parser("tiny-backbones", help=__doc__)
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)
