"""The VIST evaluation of paper Table 1 through the library API (``gill-hf eval vist`` does the same).

    # a fresh adapter on tiny random backbones and a toy VIST file (CPU, seconds; the numbers are meaningless):
    python examples/evaluate.py --tiny /tmp/gill-eval
    # a trained GILL on the real VIST SIS validation file:
    python examples/evaluate.py --model runs/gill --annotations sis/val.story-in-sequence.json \
        --image-dir sis/val_images --seeds 0 1 2 3 4 --out vist_eval

Generated images are kept under OUT/images and reused when the script is run again.
"""

import argparse
import os

from gill_hf import GILLForConditionalGeneration, build_tiny_backbones
from gill_hf.evaluation import (
    ClipImageEmbedder,
    DiffusionSettings,
    EvaluatedModels,
    LPIPSScorer,
    evaluate_vist,
    load_vist,
)
from gill_hf.toy_world import write_toy_vist


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained GILL folder or Hub id")
    parser.add_argument("--tiny", metavar="DIR", help="a fresh GILL on tiny random backbones + toy stories in DIR")
    parser.add_argument("--annotations", help="VIST SIS JSON")
    parser.add_argument("--image-dir", help="VIST image folder")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--clip-model", default="openai/clip-vit-large-patch14")
    parser.add_argument("--out", default="vist_eval")
    args = parser.parse_args()

    if args.tiny:  # tiny backbones, 5-step toy stories; a random CLIP and 2 diffusion steps keep it fast
        paths = build_tiny_backbones(os.path.join(args.tiny, "backbones"))
        model = GILLForConditionalGeneration.from_backbones(paths["opt"], paths["clip"], paths["sd"])
        args.annotations = write_toy_vist(os.path.join(args.tiny, "vist"), num_stories=4, steps=5)
        args.image_dir, args.clip_model, args.steps = os.path.dirname(args.annotations), paths["clip"], 2
    elif args.model:
        model = GILLForConditionalGeneration.from_pretrained(args.model)
    else:
        parser.error("give --model or --tiny")

    examples = load_vist(args.annotations, args.image_dir)
    models = EvaluatedModels(model, DiffusionSettings(num_inference_steps=args.steps, guidance_scale=7.5))
    # LPIPS uses torchmetrics' AlexNet; its ImageNet weights are downloaded once by torchvision
    results = evaluate_vist(models, examples, args.out, args.seeds, ClipImageEmbedder(args.clip_model),
                            LPIPSScorer("alex"))
    for row in results["rows"]:
        print(f"{row['model']:>16} | {row['setting']:<22} | CLIP {row['clip_similarity']['mean']:.3f} "
              f"| LPIPS {row['lpips']['mean']:.3f}")
    print(f"table: {args.out}/results.md, samples: {args.out}/samples.html")


if __name__ == "__main__":
    main()
