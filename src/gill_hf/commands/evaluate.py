"""``gill-hf eval vist|visdial|retrieval|decision|fid|minigpt5-vist|cc3m|mmdialog MODEL --out DIR ...``: reproduce
GILL's evaluations (Tables 1, 2, 5, 6, 8 and Fig. 8) and MiniGPT-5's (Tables 1-3, 5, 6) for a GILL checkpoint;
writes results.json, results.md and samples.html to DIR. Generated images and texts are kept under DIR and reused
when the command is run again with the same model and settings; a rerun into DIR with another model or other
generation settings is refused, naming what changed (use another --out, or delete the folder it names)."""

import argparse

from . import UsageError, bounded, existing_path, model_source, output_path, torch_device

BENCHMARKS = ("vist", "visdial", "retrieval", "decision", "fid", "minigpt5-vist", "cc3m", "mmdialog")


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
               "--index": ("index", "folder"), "--is-feature": ("is_feature", "file"),
               "--tsv": ("tsv", "file")}


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
        feature = _exported_module(args.fid_feature, device)
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


def _exported_module(path: str | None, device: str):
    """A torch.export file (.pt2) as a module on ``device``, or None."""
    import torch

    return torch.export.load(path).module().to(device) if path else None


def _file_digest(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _minigpt5_metrics(args, device: str, with_text: bool):
    """The run's image scorers; FID only where the benchmark has the --fid-* options (not mmdialog)."""
    from ..evaluation import ClipImageEmbedder, FIDScorer
    from ..evaluation.image_quality import INCEPTION_FEATURE, ImageMetrics, InceptionScorer

    clip = ClipImageEmbedder(args.clip_model, device, with_text=with_text)
    inception = InceptionScorer(_exported_module(args.is_feature, device), args.is_splits, device)
    if not hasattr(args, "fid_cache"):
        return ImageMetrics(clip, None, inception, None, None)
    fid_feature = _exported_module(args.fid_feature, device)
    return ImageMetrics(clip, FIDScorer(fid_feature, device), inception, args.fid_cache,
                        INCEPTION_FEATURE if fid_feature is None else f"file-sha256-{_file_digest(args.fid_feature)}")


def _text_scorers(args, device: str, meteor: bool):
    from ..evaluation.text_metrics import SentenceSimilarity, TextScorers, load_wordnet

    wordnet = load_wordnet() if meteor else None  # a missing WordNet is named before any model loads
    return TextScorers(SentenceSimilarity(args.sbert_model, device), wordnet)


def run_minigpt5(args) -> int:
    """``minigpt5-vist``, ``cc3m`` and ``mmdialog``: inputs checked and read first, then the models load."""
    from .. import evaluation as ev
    from ..evaluation.minigpt5_vist import PROMPT_TYPES

    device, dtype = _setup(args)
    tables = getattr(args, "tables", None)
    if tables is not None:  # minigpt5-vist: each scorer option belongs to the image tables or to the narrations
        for needed, options in ((any(t != "narration" for t in tables), IMAGE_SCORER_OPTIONS),
                                ("narration" in tables, TEXT_SCORER_OPTIONS)):
            given = [option for option in options if not needed and
                     getattr(args, option[2:].replace("-", "_")) != args.scorer_defaults[option]]
            if given:
                raise UsageError(f"{', '.join(given)} do not apply to --tables {' '.join(tables)}")
    if hasattr(args, "fid_cache"):
        args.fid_cache = output_path(args.fid_cache, "--fid-cache", "folder")
    if args.benchmark == "mmdialog" and not args.baseline:
        raise UsageError("mmdialog has no Stable Diffusion baseline to skip; drop --no-baseline")
    if tables == ["narration"] and args.seeds != [0]:
        raise UsageError("--seeds drive the diffusion of the image tables; narrations are greedy (one run)")
    if tables == ["narration"] and not args.baseline:
        raise UsageError("narration has no Stable Diffusion baseline to skip; drop --no-baseline")
    if tables is not None and "final-step" not in tables and args.prompt_types != list(PROMPT_TYPES):
        raise UsageError("--prompt-types choose the final-step table's inputs; add final-step to --tables")
    if args.benchmark == "minigpt5-vist":
        from ..evaluation.minigpt5_vist import evaluate_minigpt5_vist

        examples = ev.load_vist(args.annotations, args.image_dir, args.limit)
        narration, image_tables = "narration" in args.tables, [t for t in args.tables if t != "narration"]
        text_scorers = _text_scorers(args, device, meteor=True) if narration else None
        metrics = _minigpt5_metrics(args, device, with_text=False) if image_tables else None
        evaluate_minigpt5_vist(_models(args, device, dtype), examples, args.out, args.seeds, metrics, text_scorers,
                               [PROMPT_TYPES[key] for key in args.prompt_types], args.tables, args.baseline,
                               args.max_new_tokens, args.prompt_format)
    elif args.benchmark == "cc3m":
        from ..evaluation.cc3m import evaluate_cc3m

        examples = ev.load_caption_set(args.tsv, args.image_dir, args.limit)
        metrics = _minigpt5_metrics(args, device, with_text=True)
        evaluate_cc3m(_models(args, device, dtype), examples, args.out, args.seeds, metrics, args.baseline)
    else:
        from ..evaluation.mmdialog import evaluate_mmdialog
        from ..training.mmdialog import read_mmdialog

        dialogues = read_mmdialog(args.annotations, args.image_dir)[:args.limit]
        text_scorers, metrics = _text_scorers(args, device, meteor=False), _minigpt5_metrics(args, device, True)
        evaluate_mmdialog(_models(args, device, dtype), dialogues, args.out, args.seeds, metrics, text_scorers,
                          args.max_new_tokens, args.prompt_format)
    _print_table(args.out)
    return 0


IMAGE_SCORER_OPTIONS = ("--clip-model", "--is-feature", "--is-splits", "--fid-feature", "--fid-cache")
TEXT_SCORER_OPTIONS = ("--sbert-model", "--max-new-tokens")


def _minigpt5_options(parser, clip: str, text: bool, fid: bool = True):
    """The scorer options; ``fid``: the --fid-* options (MMDialog has no FID). Their defaults are kept as
    ``args.scorer_defaults`` so a run can refuse the ones its tables do not use."""
    from huggingface_hub import constants

    from ..evaluation.text_metrics import DEFAULT_SBERT

    parser.add_argument("--clip-model", default=clip,
                        help=f"CLIP for CLIP-I / CLIP-T / MM-Relevance (default {clip}, as MiniGPT-5): open_clip "
                             f"'open_clip:<arch>/<tag>' / 'hf-hub:<repo>', or a transformers CLIP id/folder")
    parser.add_argument("--is-feature", default=None,
                        help="a torch.export Inception Score classifier (.pt2; uint8 (N, 3, 299, 299) -> (N, "
                             "classes) logits); default: torchmetrics' InceptionV3 logits")
    parser.add_argument("--is-splits", type=bounded(int, 2), default=10, help="Inception Score splits (>= 2)")
    if fid:
        parser.add_argument("--fid-feature", default=None,
                            help="a torch.export FID feature extractor (.pt2; uint8 (N, 3, 299, 299) -> (N, d)); "
                                 "default: torchmetrics' InceptionV3 2048-d features (torch-fidelity weights)")
        parser.add_argument("--fid-cache", default=f"{constants.HF_HOME}/gill_hf/fid_reference",
                            help="folder of cached FID reference statistics, keyed by image set and feature extractor")
    if text:
        parser.add_argument("--sbert-model", default=DEFAULT_SBERT, help="sentence-transformers model for SBERT")
        parser.add_argument("--max-new-tokens", type=bounded(int, 1), default=32, help="tokens per generated text")
    parser.set_defaults(scorer_defaults={option: parser.get_default(option[2:].replace("-", "_"))
                                         for option in IMAGE_SCORER_OPTIONS + TEXT_SCORER_OPTIONS})


def _prompt_format_option(parser):
    """``--prompt-format``: MiniGPT-5's prompt strings (the default: what its checkpoints and this library's
    stage-2 recipe train on) or the plain interleaved parts (e.g. for GILL checkpoints)."""
    from ..training.data import PROMPT_FORMATS

    parser.add_argument("--prompt-format", default="minigpt5", choices=PROMPT_FORMATS,
                        help="minigpt5: prompt as MiniGPT-5's stage-2 data (system prompt, ###Human: / ###Assistant:, "
                             "<Img> placeholders, answers ending at ###), for models trained on it (default); plain: "
                             "the texts and images interleaved, as GILL")


def _register_minigpt5(benchmarks):
    from ..evaluation.minigpt5_vist import PROMPT_TYPES, TABLES

    vist = benchmarks.add_parser("minigpt5-vist", parents=[_common(True)],
                                 help="MiniGPT-5 Tables 1-3: VIST final-step / all-steps images, narrations")
    vist.add_argument("--annotations", required=True, help="VIST SIS JSON (e.g. sis/val.story-in-sequence.json)")
    vist.add_argument("--image-dir", required=True, help="folder of the VIST images (<photo id>.jpg/.png)")
    vist.add_argument("--tables", nargs="+", default=list(TABLES), choices=TABLES)
    vist.add_argument("--prompt-types", nargs="+", default=list(PROMPT_TYPES), choices=PROMPT_TYPES,
                      help="final-step inputs: none, text, image, image-text context")
    _prompt_format_option(vist)
    _minigpt5_options(vist, "open_clip:ViT-L-14/openai", text=True)

    cc3m = benchmarks.add_parser("cc3m", parents=[_common(True)],
                                 help="MiniGPT-5 Table 6: CC3M single-image generation")
    cc3m.add_argument("--tsv", required=True, help="caption<TAB>image TSV with a header (e.g. cc3m_val.tsv)")
    cc3m.add_argument("--image-dir", default=None, help="folder of the images (default: the TSV's)")
    _minigpt5_options(cc3m, "open_clip:ViT-L-14/openai", text=False)

    mmdialog = benchmarks.add_parser("mmdialog", parents=[_common(True)],
                                     help="MiniGPT-5 Table 5: MMDialog multi-turn responses")
    mmdialog.add_argument("--annotations", required=True, help="MMDialog JSONL (e.g. test/test_conversations.txt)")
    mmdialog.add_argument("--image-dir", default=None, help="folder of <media id>.jpg (default: the file's)")
    _prompt_format_option(mmdialog)
    _minigpt5_options(mmdialog, "open_clip:ViT-B-32/openai", text=True, fid=False)
    for sub in (vist, cc3m, mmdialog):
        sub.set_defaults(func=run_minigpt5)


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
    _register_minigpt5(benchmarks)
