"""``gill-hf build-index MODEL OUT_DIR --images DIR | --tsv FILE | --shards TAR ...``: embed a corpus into a
retrieval index (memory-mapped exact search, optionally FAISS beside it); a killed run resumes where it stopped."""

from . import UsageError, bounded, existing_path, model_source, output_path, torch_device


def check_args(args):
    """Paths, option combinations and the source itself (its files listed, the TSV header read) before the model
    loads; returns the opened source."""
    from ..index_building import check_out_dir, open_source

    args.model = model_source(args.model, "model")
    args.out_dir = output_path(args.out_dir, "out_dir", "folder")
    if args.images:
        args.images = existing_path(args.images, "--images", "folder")
    if args.tsv:
        args.tsv = existing_path(args.tsv, "--tsv", "file")
    if args.shards:
        args.shards = [existing_path(shard, "--shards", "file") for shard in args.shards]
    for option, value in (("--image-dir", args.image_dir), ("--image-column", args.image_column)):
        if value is not None and not args.tsv:
            raise UsageError(f"{option} applies to --tsv only")
    if args.image_dir:
        args.image_dir = existing_path(args.image_dir, "--image-dir", "folder")
    try:
        check_out_dir(args.out_dir)
    except ValueError as err:
        raise UsageError(f"out_dir {err}") from err
    if args.part_size % args.batch_size:
        raise UsageError(f"--part-size must be a multiple of --batch-size ({args.batch_size}), got {args.part_size}")
    ivfpq_options = {"nlist": args.nlist, "pq_m": args.pq_m, "nprobe": args.nprobe}
    given = sorted(f"--{name.replace('_', '-')}" for name, value in ivfpq_options.items() if value is not None)
    if given and args.faiss != "ivfpq":
        raise UsageError(f"{', '.join(given)} apply to --faiss ivfpq only")
    args.faiss_options = {name: value for name, value in ivfpq_options.items() if value is not None}
    try:
        return open_source(args.images, args.tsv, args.shards, image_column=args.image_column or "image",
                           image_dir=args.image_dir)
    except ValueError as err:
        raise UsageError(str(err)) from err


def run(args) -> int:
    from functools import partial

    import torch

    from ..index_building import build_index
    from ..modeling_gill import GILLForConditionalGeneration
    from ..retrieval import embed_images

    source = check_args(args)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = GILLForConditionalGeneration.from_pretrained(args.model).to(device).eval()
    built = build_index(partial(embed_images, model), source, args.out_dir,
                        logit_scale=model.adapter.logit_scale.item(), batch_size=args.batch_size,
                        part_size=args.part_size, dtype=getattr(torch, args.dtype), faiss=args.faiss,
                        faiss_options=args.faiss_options, progress=not args.no_progress)
    print(f"retrieval index of {len(built.index)} images in {args.out_dir} ({built.num_skipped} of "
          f"{built.num_records} records skipped)")
    return 0


def register(subparsers):
    parser = subparsers.add_parser("build-index", help=__doc__.split(":")[0])
    parser.add_argument("model", help="a trained GILL model folder or Hub id (its CLIP and W_i2t embed the images)")
    parser.add_argument("out_dir", help="folder of the index (an unfinished build there is resumed)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="folder of images (sub-folders too), indexed by their paths")
    source.add_argument("--tsv", help="TSV with a header; its --image-column names files under --image-dir")
    source.add_argument("--shards", nargs="+", help="webdataset tar shards (img2dataset's jpg/txt/json)")
    parser.add_argument("--image-column", default=None, help="the TSV's image column (default: image)")
    parser.add_argument("--image-dir", default=None, help="folder of the TSV's images (default: the TSV's folder)")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=64)
    parser.add_argument("--part-size", type=bounded(int, 1), default=4096,
                        help="records per resumable part (a multiple of --batch-size)")
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--faiss", default=None, choices=["flat", "fp16", "ivfpq"],
                        help="also save a FAISS index (exact IndexFlatIP, exact fp16 codes, or IVF-PQ with an "
                             "exact re-rank), loaded with the index")
    parser.add_argument("--nlist", type=bounded(int, 1), default=None, help="IVF-PQ cells (default ~4 sqrt(N))")
    parser.add_argument("--pq-m", type=bounded(int, 1), default=None, help="IVF-PQ sub-quantisers (divide p)")
    parser.add_argument("--nprobe", type=bounded(int, 1), default=None, help="IVF-PQ cells searched (default 16)")
    parser.add_argument("--device", type=torch_device, default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
