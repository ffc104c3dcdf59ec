"""``gill-hf tiny-backbones OUT_DIR [--pretrained]``: write the tiny offline backbones.

Without ``--pretrained``: the random OPT / Llama / CLIP / Stable Diffusion checkpoints the unit tests use (seconds).
With ``--pretrained``: retrain the backbones that know the toy world (an OPT on toy stories, a Stable Diffusion on
the shapes, the probe that judges images; about 16 minutes on 2 busy CPU cores) into OUT_DIR: ``weights/*.safetensors``
(the fp16 files shipped in ``gill_hf/toy_world/weights``), loadable ``llm/``, ``clip/``, ``sd/`` folders and
``checks.json``; exits 1 if their quality checks fail.
"""

import json

from . import output_path


def run(args) -> int:
    out_dir = output_path(args.out_dir, "out_dir", "folder")
    if not args.pretrained:
        from ..tiny import build_tiny_backbones

        print(json.dumps(build_tiny_backbones(out_dir, seed=args.seed), indent=2))
        return 0
    from ..demo.quickstart import torch_threads
    from ..toy_world.backbones import PretrainSettings, pretrain_toy_backbones

    with torch_threads(1):  # tiny models: one thread is fastest on a busy machine
        record = pretrain_toy_backbones(out_dir, PretrainSettings(seed=args.seed))
    checks = record["checks"]
    print(json.dumps({"timings_s": record["timings_s"], "passed": checks["passed"],
                      **{k: v for k, v in checks.items() if k not in ("passed", "llm_samples")}}, indent=1))
    return 0 if checks["passed"] else 1


def register(subparsers):
    parser = subparsers.add_parser("tiny-backbones", help=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pretrained", action="store_true",
                        help="train the backbones that know the toy world (about 16 minutes on 2 busy CPU cores)")
    parser.set_defaults(func=run)
