"""Publish a trained GILL adapter (safetensors), its processor, model card and retrieval index to the Hub.

    hf auth login
    python examples/push_to_hub.py --model runs/gill --repo-id your-name/gill-opt-6.7b --index runs/index
    # a fresh adapter on tiny random backbones (to try the upload path):
    python examples/push_to_hub.py --tiny /tmp/gill-tiny --repo-id your-name/gill-tiny

Only the adapter travels; the backbones are named in the card's ``base_model`` and load from their own repos.
"""

import argparse
import os

from gill_hf import GILLForConditionalGeneration, build_tiny_backbones


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained GILL folder")
    parser.add_argument("--tiny", metavar="DIR", help="a fresh GILL on tiny random backbones built under DIR")
    parser.add_argument("--repo-id", required=True)
    parser.add_argument("--index", help="a saved RetrievalIndex folder to publish beside the adapter")
    parser.add_argument("--dataset", action="append", default=[], help="training dataset id (repeatable)")
    parser.add_argument("--private", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        bb = build_tiny_backbones(os.path.join(args.tiny, "backbones"))
        model = GILLForConditionalGeneration.from_backbones(bb["opt"], bb["clip"], bb["sd"])
    elif args.model:
        model = GILLForConditionalGeneration.from_pretrained(args.model)
    else:
        parser.error("give --model or --tiny")
    info = model.push_to_hub(args.repo_id, retrieval_index=args.index, datasets=args.dataset, private=args.private)
    print(f"pushed {args.repo_id}: {info.commit_url}")


if __name__ == "__main__":
    main()
