"""Convert the original GILL release (kohjingyu/gill) and answer an interleaved prompt with it.

    # tiny stand-ins for the release files (random values at tiny widths; CPU, seconds):
    python examples/load_original_release.py --tiny /tmp/gill-tiny --out /tmp/gill-original
    # the real release (pretrained_ckpt.pth.tar, model_args.json, decision_model.pth.tar, cc3m_embeddings_urls.npy):
    python examples/load_original_release.py --release gill_release/ --out gill-original

The converted folder loads with ``GILLForConditionalGeneration.from_pretrained``; its ``retrieval_index/`` holds
the release's CC3M image URLs and their retrieval embeddings.
"""

import argparse
import os

import torch

from gill_hf import GILLForConditionalGeneration, GILLPipeline, RetrievalIndex, convert_original_release
from gill_hf.convert_original import RELEASE_FILES
from gill_hf.tiny import build_tiny_backbones, build_tiny_release


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release", help="folder with the four release files")
    parser.add_argument("--tiny", metavar="DIR", help="write tiny stand-ins for the release files under DIR")
    parser.add_argument("--out", required=True, help="new output folder")
    parser.add_argument("--prompt", default="Show me a picture of a dog on the beach.")
    parser.add_argument("--steps", type=int, default=50, help="diffusion steps")
    args = parser.parse_args()
    if not (args.release or args.tiny):
        parser.error("give --release or --tiny")
    diffusion = None
    if args.tiny:
        backbones = build_tiny_backbones(os.path.join(args.tiny, "backbones"))
        files = build_tiny_release(os.path.join(args.tiny, "release"), backbones)
        diffusion = backbones["sd"]
    else:
        files = {name: os.path.join(args.release, file) for name, file in RELEASE_FILES.items()}
    summary = convert_original_release(files["checkpoint"], files["model_args"], args.out, decision=files["decision"],
                                       embeddings=files["embeddings"], with_processor=True)
    print(f"converted {summary['tensors']} tensors ({summary['parameters']:,} values) into {args.out}")

    dtype = torch.bfloat16 if torch.cuda.is_available() else None
    model = GILLForConditionalGeneration.from_pretrained(args.out, dtype=dtype)
    index = RetrievalIndex.load(os.path.join(args.out, "retrieval_index"))
    pipe = GILLPipeline.from_gill(model, diffusion, retrieval_index=index, dtype=dtype)
    answer = pipe([args.prompt], force_image_after=0, num_inference_steps=args.steps,
                  generator=torch.Generator().manual_seed(0))
    for part in answer.parts:
        if isinstance(part, str):
            print("text:", part)
        else:
            where = part.path if part.kind == "retrieved" else "(generated)"
            print(f"image: {part.kind} {where}, P(retrieve)={part.decision.p_retrieve:.3f}")


if __name__ == "__main__":
    main()
