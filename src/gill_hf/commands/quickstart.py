"""``gill-hf quickstart``: the whole method on tiny offline backbones, in a few minutes on a CPU.

Trains a GILL adapter on a procedural shapes corpus with the HF Trainer, measures retrieval, generation and the
retrieve-vs-generate decision on held-out scenes against their baselines, answers held-out stories with text and
retrieved or generated images, saves the adapter with a model card, reloads it and checks that it answers
identically; writes report.html and report.json (see ``gill_hf.demo.quickstart``). Exits 1 if the reload differs.
"""

from dataclasses import fields

from . import UsageError, output_path


def run(args) -> int:
    from ..demo import QuickstartSettings, run_quickstart

    names = {f.name for f in fields(QuickstartSettings)}
    try:
        settings = QuickstartSettings(**{k: v for k, v in vars(args).items() if k in names})
    except ValueError as error:  # option values the settings reject, named by their field
        raise UsageError(f"quickstart: {error}") from None
    report = run_quickstart(output_path(args.out, "--out", "folder"), settings)
    return 0 if report["reload"]["identical"] else 1


def register(subparsers):
    from ..demo.quickstart import DEFAULT_OUT_DIR, QuickstartSettings

    defaults = QuickstartSettings()
    parser = subparsers.add_parser("quickstart", help=__doc__.splitlines()[0])
    parser.add_argument("--out", default=DEFAULT_OUT_DIR, help="output folder")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="adapter optimizer steps")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--train-size", type=int, default=defaults.train_size, help="training pairs")
    parser.add_argument("--eval-size", type=int, default=defaults.eval_size,
                        help="held-out scenes (never trained on; they make the retrieval index)")
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--logging-steps", type=int, default=defaults.logging_steps)
    parser.add_argument("--diffusion-steps", type=int, default=defaults.diffusion_steps)
    parser.add_argument("--num-stories", type=int, default=defaults.num_stories)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.set_defaults(func=run)
