"""``gill-hf eval vist|visdial|retrieval|decision|fid MODEL --out DIR ...``: reproduce the paper's evaluations
(Tables 1, 2, 5, 6, 8 and Fig. 8) for a GILL checkpoint; writes results.json, results.md and samples.html to DIR.
Generated images are kept under DIR/images and reused when the command is run again."""

import argparse

from . import bounded, existing_path, model_source, output_path, torch_device

BENCHMARKS = ("vist", "visdial", "retrieval", "decision", "fid")


def _common(generation: bool, steps: int = 50, guidance: float = 7.5) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("model", help="a saved GILL folder or Hub repo id")
    parser.add_argument("--out", required=True, help="output folder (results, images, samples.html)")
    parser.add_argument("--limit", type=bounded(int, 1), default=None, help="evaluate only the first N examples")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="backbone / diffusion dtype (default: as saved)")
    if generation:
        parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (mean ± std)")
        parser.add_argument("--steps", type=bounded(int, 1), default=steps, help="diffusion steps")
        parser.add_argument("--guidance-scale", type=bounded(float, 0.0), default=guidance)
        parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                            help="skip the Stable Diffusion baseline rows")
    return parser


def _similarity_options(parser):
    from ..evaluation.metrics import DEFAULT_CLIP

    parser.add_argument("--clip-model", default=DEFAULT_CLIP,
                        help="transformers CLIP id/folder, or open_clip 'hf-hub:<repo>' / 'open_clip:<arch>/<tag>'")
    parser.add_argument("--lpips-net", default="alex", choices=["alex", "vgg", "squeeze"])


# Input paths of each benchmark: option -> (attribute, "file" / "folder").
INPUT_PATHS = {"--annotations": ("annotations", "file"), "--image-dir": ("image_dir", "folder"),
               "--captions": ("captions", "file"), "--fid-feature": ("fid_feature", "file"),
               "--index": ("index", "folder")}


def check_args(args):
    """The model source, every input path and the output folder, before anything loads (``UsageError``)."""
    args.model = model_source(args.model, "model")
    for option, (name, kind) in INPUT_PATHS.items():
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [existing_path(v, option, kind) for v in value])
        elif value is not None:
            setattr(args, name, existing_path(value, option, kind))
    args.out = output_path(args.out, "--out", "folder")


def _setup(args):
    from ..evaluation.metrics import default_device, parse_dtype

    check_args(args)
    return args.device or default_device(), parse_dtype(args.dtype)


def _models(args, device, dtype, scheduler=None):
    from ..evaluation import DiffusionSettings, EvaluatedModels

    return EvaluatedModels.load(args.model, device=device, dtype=dtype, settings=DiffusionSettings(
        args.steps, args.guidance_scale, scheduler))


def _scorers(args, device):
    from ..evaluation import ClipImageEmbedder, LPIPSScorer

    return ClipImageEmbedder(args.clip_model, device), LPIPSScorer(args.lpips_net, device)


def _print_table(out_dir: str):
    import os

    with open(os.path.join(out_dir, "results.md"), encoding="utf-8") as f:
        print(f.read())
    print(f"wrote {out_dir}/results.json, results.md, samples.html")


def run(args) -> int:
    from .. import evaluation as ev
    from ..evaluation.contexts import VIST_SETTING_KEYS

    device, dtype = _setup(args)
    if args.benchmark in ("vist", "retrieval"):
        args.settings = [VIST_SETTING_KEYS[key] for key in args.settings]
    if args.benchmark in ("vist", "retrieval"):
        examples = ev.load_vist(args.annotations, args.image_dir, args.limit)
    elif args.benchmark == "visdial":
        examples = ev.load_visdial(args.annotations, args.image_dir, args.limit)
    elif args.benchmark == "fid":
        examples = ev.load_caption_set(args.captions, args.image_dir, args.limit, args.sample, args.sample_seed)
    if args.benchmark == "vist":
        ev.evaluate_vist(_models(args, device, dtype), examples, args.out, args.seeds, *_scorers(args, device),
                         settings=args.settings, baseline=args.baseline)
    elif args.benchmark == "visdial":
        ev.evaluate_visdial(_models(args, device, dtype), examples, args.out, args.seeds, *_scorers(args, device),
                            rounds=args.rounds, curve=args.curve, baseline=args.baseline)
    elif args.benchmark == "fid":
        import torch

        feature = torch.export.load(args.fid_feature).module().to(device) if args.fid_feature else None
        scheduler = None if args.scheduler == "default" else args.scheduler
        ev.evaluate_fid(_models(args, device, dtype, scheduler), examples, args.out, args.seeds, feature=feature,
                        device=device, baseline=args.baseline)
    else:
        from ..modeling_gill import GILLForConditionalGeneration

        model = GILLForConditionalGeneration.from_pretrained(args.model, dtype=dtype).to(device)
        if args.benchmark == "retrieval":
            ev.evaluate_retrieval(model, examples, args.out, settings=args.settings, batch_size=args.batch_size)
        else:
            from ..retrieval import RetrievalIndex

            index = RetrievalIndex.load(args.index) if args.index else None
            ev.evaluate_decision(model, args.annotations, args.out, num_train=args.num_train, limit=args.limit,
                                 index=index, batch_size=args.batch_size)
    _print_table(args.out)
    return 0


def register(subparsers):
    from ..evaluation.contexts import MAX_VISDIAL_ROUNDS, VISDIAL_ROUNDS, VIST_SETTING_KEYS

    parser = subparsers.add_parser("eval", help=__doc__.splitlines()[0], description=__doc__)
    benchmarks = parser.add_subparsers(dest="benchmark", required=True)

    vist = benchmarks.add_parser("vist", parents=[_common(True)], help="Table 1: VIST contextual image generation")
    retrieval = benchmarks.add_parser("retrieval", parents=[_common(False)], help="Table 5: VIST retrieval R@k")
    for sub in (vist, retrieval):
        sub.add_argument("--annotations", required=True, help="VIST SIS JSON (e.g. sis/val.story-in-sequence.json)")
        sub.add_argument("--image-dir", required=True, help="folder of the VIST images (<photo id>.jpg/.png)")
        sub.add_argument("--settings", nargs="+", default=list(VIST_SETTING_KEYS), choices=VIST_SETTING_KEYS,
                         help="1cap = 1 caption, 5cap = 5 captions, 5cap4img = 5 captions + 4 images")
    _similarity_options(vist)
    retrieval.add_argument("--batch-size", type=bounded(int, 1), default=8)

    visdial = benchmarks.add_parser("visdial", parents=[_common(True)],
                                    help="Table 2 / Fig. 8: VisDial contextual image generation")
    visdial.add_argument("--annotations", required=True, help="VisDial v1.0 JSON (e.g. visdial_1.0_val.json)")
    visdial.add_argument("--image-dir", required=True, help="folder of the dialog images (named by image id)")
    visdial.add_argument("--rounds", type=bounded(int, 1, MAX_VISDIAL_ROUNDS), nargs="+",
                         default=list(VISDIAL_ROUNDS))
    visdial.add_argument("--curve", action="store_true", help="every number of rounds 1..10, plotted (Fig. 8)")
    _similarity_options(visdial)

    decision = benchmarks.add_parser("decision", parents=[_common(False)],
                                     help="Table 6: retrieve-vs-generate macro-F1 on PartiPrompts")
    decision.add_argument("--annotations", nargs="+", required=True,
                          help="PartiPromptsDecisionsConfident.tsv and/or PartiPromptsAllDecisions_*.tsv")
    decision.add_argument("--num-train", type=bounded(int, 1), default=600,
                          help="labelled prompts before the validation split")
    decision.add_argument("--index", help="a saved RetrievalIndex (adds the max-cosine heuristic)")
    decision.add_argument("--batch-size", type=bounded(int, 1), default=32)

    fid = benchmarks.add_parser("fid", parents=[_common(True, steps=250, guidance=3.0)],
                                help="Table 8: FID on a caption set (MS-COCO protocol)")
    fid.add_argument("--captions", required=True, help="COCO captions JSON or caption<TAB>image TSV")
    fid.add_argument("--image-dir", default=None, help="folder of the reference images (default: the file's)")
    fid.add_argument("--sample", type=bounded(int, 1), default=None,
                     help="evaluate this many randomly drawn captioned images (the paper: 30000)")
    fid.add_argument("--sample-seed", type=int, default=0, help="seed of the --sample draw")
    fid.add_argument("--scheduler", default="ddim", choices=["ddim", "default"],
                     help="ddim as the paper, or the checkpoint's own scheduler")
    fid.add_argument("--fid-feature", default=None,
                     help="a torch.export feature extractor (.pt2; uint8 (N, 3, 299, 299) -> (N, d)); default: "
                          "torchmetrics' InceptionV3 2048-d features (torch-fidelity weights, downloaded once)")
    fid.set_defaults(func=run)
    for sub in (vist, retrieval, visdial, decision):
        sub.set_defaults(func=run)
