"""Fit GILL's retrieve-vs-generate head on the PartiPrompts annotations and compare with Table 6's baselines.

    python examples/train_decision.py --tiny /tmp/gill-tiny          # tiny random backbones: runs in seconds
    python examples/train_decision.py --model path/to/trained-gill --out decision-head/

Prints validation macro-F1 at 0.5, the threshold sweep and the always-retrieve / always-generate / random
baselines; ``--out`` saves the model (adapter incl. the head, and the chosen ``decision_threshold``).
"""

import argparse

from gill_hf import GILLForConditionalGeneration, build_tiny_backbones
from gill_hf.training.decision_training import fit_decision_model

ANNOTATIONS = "/work/shared/data/gill-release/PartiPromptsAllDecisions_Alignment.tsv"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a trained GILL folder or Hub id")
    parser.add_argument("--tiny", metavar="DIR", help="use a fresh GILL on tiny random backbones built under DIR")
    parser.add_argument("--annotations", default=ANNOTATIONS, help="PartiPrompts decisions TSV (votes or labels)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", help="save the model with its fitted head here")
    args = parser.parse_args()
    if args.tiny:
        bb = build_tiny_backbones(args.tiny)
        model = GILLForConditionalGeneration.from_backbones(bb["opt"], bb["clip"], bb["sd"])
    elif args.model:
        model = GILLForConditionalGeneration.from_pretrained(args.model)
    else:
        parser.error("give --model or --tiny")
    report = fit_decision_model(model.eval(), args.annotations, steps=args.steps)
    print(f"validation: {report['val_counts']}  (train on the first {report['num_train']})")
    print(f"train loss {report['losses'][0]:.4f} -> {report['losses'][-1]:.4f}")
    for name, f1 in report["baselines"].items():
        print(f"  {name:<16} macro-F1 {f1:.3f}")
    print(f"  {'linear head':<16} macro-F1 {report['f1_at_0.5']:.3f} at 0.5, "
          f"{min(report['sweep'].values()):.3f} - {max(report['sweep'].values()):.3f} over the sweep "
          f"(best threshold {report['best_threshold']})")
    if args.out:
        model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
