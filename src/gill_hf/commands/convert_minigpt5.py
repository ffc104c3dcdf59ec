"""``gill-hf convert-minigpt5``: turn MiniGPT-5's Lightning checkpoints into a gill_hf model folder."""

import json

from . import existing_path, output_path

DEFAULT_LLM = "Vision-CAIR/vicuna-7b"  # MiniGPT-5's Vicuna v0 7B
DEFAULT_VISION = "openai/clip-vit-large-patch14"
DEFAULT_DIFFUSION = "stabilityai/stable-diffusion-2-1-base"


def run(args) -> int:
    from ..convert_minigpt5 import convert_minigpt5

    for name in ("stage1", "stage2", "minigpt4"):  # before any file is read
        if getattr(args, name):
            existing_path(getattr(args, name), f"--{name}", "file")
    output_path(args.out, "OUT", "folder")
    summary = convert_minigpt5(args.stage1, args.out, args.stage2, text_model=args.llm, vision_model=args.vision,
                               diffusion_model=args.diffusion, minigpt4=args.minigpt4)
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers):
    parser = subparsers.add_parser("convert-minigpt5", help=__doc__, description=__doc__)
    parser.add_argument("--stage1", required=True, help="stage1_cc3m.ckpt (holds fc and the mapper queries, so a "
                                                        "stage-2 conversion needs it too)")
    parser.add_argument("--stage2", help="stage2_vist.ckpt or stage2_mmdialog.ckpt (LoRA, voken rows, mapper)")
    parser.add_argument("--llm", default=DEFAULT_LLM, help=f"the LLM backbone, Hub id or path (default {DEFAULT_LLM})")
    parser.add_argument("--vision", default=DEFAULT_VISION,
                        help=f"the vision backbone: a BLIP-2 checkpoint (MiniGPT-4's ViT-g + Q-Former input side, "
                             f"with --minigpt4) or a CLIP vision model (default {DEFAULT_VISION}; W_cap then untrained)")
    parser.add_argument("--minigpt4", help="MiniGPT-4's prerained_minigpt4_7b.pth: its llama_proj becomes the frozen "
                                           "W_cap (needed with a BLIP-2 --vision; the MiniGPT-5 files lack it)")
    parser.add_argument("--diffusion", default=DEFAULT_DIFFUSION,
                        help=f"the diffusion model, Hub id or path (default {DEFAULT_DIFFUSION})")
    parser.add_argument("out", metavar="OUT", help="new (or empty) output folder")
    parser.set_defaults(func=run)
