"""Interleaved generation: text and images in, text plus retrieved or generated images out, saved as HTML.

    # a fresh adapter on tiny random backbones (CPU, seconds; the answer is noise, the plumbing is real):
    python examples/generate_interleaved.py --tiny /tmp/gill-tiny --image dog.jpg --out answer.html
    # a trained GILL, with a retrieval index over your own images (enables the retrieve-vs-generate decision):
    python examples/generate_interleaved.py --model runs/gill --index-images photos/*.jpg --image dog.jpg

Without ``--index-images`` every image of the answer is generated.
"""

import argparse
import os

import torch

from gill_hf import GILLForConditionalGeneration, GILLPipeline, RetrievalIndex, build_tiny_backbones
from gill_hf.commands.generate import render_html
from gill_hf.atomic import write_text_atomic
from gill_hf.processing_gill import load_image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained GILL folder or Hub id")
    parser.add_argument("--tiny", metavar="DIR", help="a fresh GILL on tiny random backbones built under DIR")
    parser.add_argument("--image", help="an image to start the conversation with")
    parser.add_argument("--text", default="Show me the same thing at the beach.")
    parser.add_argument("--index-images", nargs="*", default=[], help="images the model may retrieve")
    parser.add_argument("--steps", type=int, default=50, help="diffusion steps")
    parser.add_argument("--out", default="answer.html")
    args = parser.parse_args()
    if args.tiny:
        bb = build_tiny_backbones(os.path.join(args.tiny, "backbones"))
        model = GILLForConditionalGeneration.from_backbones(bb["opt"], bb["clip"], bb["sd"])
    elif args.model:
        dtype = torch.bfloat16 if torch.cuda.is_available() else None
        model = GILLForConditionalGeneration.from_pretrained(args.model, dtype=dtype)
    else:
        parser.error("give --model or --tiny")
    pipe = GILLPipeline.from_gill(model)
    if args.index_images:
        pipe.retrieval_index = RetrievalIndex.from_images(model, [load_image(p) for p in args.index_images],
                                                          paths=args.index_images)
    prompt = ([load_image(args.image)] if args.image else []) + [args.text]
    answer = pipe(prompt, force_image_after=0, num_inference_steps=args.steps,
                  generator=torch.Generator().manual_seed(0))
    write_text_atomic(args.out, render_html(prompt, answer.parts))
    kinds = [p.kind for p in answer.parts if not isinstance(p, str)]
    print(f"wrote {args.out}: {len(answer.parts) - len(kinds)} text parts, images {kinds}")


if __name__ == "__main__":
    main()
