"""``gill-hf convert-original``: turn the original GILL release (kohjingyu/gill) into a gill_hf model folder."""

import json

from . import existing_path, output_path


def run(args) -> int:
    from ..convert_original import convert_original_release

    for name in ("checkpoint", "model_args", "decision", "embeddings"):  # before any file is read
        if getattr(args, name):
            existing_path(getattr(args, name), f"--{name.replace('_', '-')}", "file")
    output_path(args.out, "--out", "folder")
    summary = convert_original_release(args.checkpoint, args.model_args, args.out, decision=args.decision,
                                       embeddings=args.embeddings, with_processor=args.with_processor,
                                       tokenizer=args.tokenizer, index_dtype=args.index_dtype,
                                       original_semantics=args.original_semantics)
    print(json.dumps(summary, indent=2))
    return 0


def register(subparsers):
    parser = subparsers.add_parser("convert-original", help=__doc__, description=__doc__)
    parser.add_argument("--checkpoint", required=True, help="pretrained_ckpt.pth.tar")
    parser.add_argument("--model-args", required=True, help="model_args.json")
    parser.add_argument("--decision", help="decision_model.pth.tar (default: a head that always generates, as the "
                                           "original without a decision model)")
    parser.add_argument("--embeddings", help="cc3m_embeddings*.npy (a pickle; read with a numpy-only unpickler)")
    parser.add_argument("--with-processor", action="store_true",
                        help="also save the processor, fetching the backbones' tokenizer and image processor")
    parser.add_argument("--tokenizer", help="the LLM's tokenizer (path or Hub id) the [IMG] ids are recomputed from, "
                                            "as the original's load_gill (default: opt_version of model_args.json)")
    parser.add_argument("--index-dtype", choices=["float16", "float32"],
                        help="storage of the retrieval index from --embeddings (default float16)")
    parser.add_argument("--original-semantics", action="store_true",
                        help="write a config whose losses and log-likelihoods are the original's (finite <|image|> "
                             "logit, packed rows supervise the first caption in l_p)")
    parser.add_argument("--out", required=True, help="new (or empty) output folder")
    parser.set_defaults(func=run)
