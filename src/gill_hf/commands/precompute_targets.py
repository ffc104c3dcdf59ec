"""``gill-hf precompute-targets [TSV] OUT_DIR (--shards ... | --dataset ...)``: encode every caption once with the
diffusion text encoder(s) into a target store.

The captions come from a caption<TAB>image TSV, webdataset shards (each sample's ``txt``, as img2dataset writes
them) or a ``datasets`` dataset (its caption column), read as ``gill-hf train`` reads data.tsv / data.shards /
data.dataset. A TSV's or a dataset's store is row i = example i; every store also finds rows by caption, which is
how streams train with it. Resumable (a killed run continues at the missing shards) and shardable: ``torchrun
--nproc_per_node N -m gill_hf.cli precompute-targets ...`` (or ``accelerate launch``) splits the shards between N
processes, one GPU each (each reads the captions itself)."""

import os

from . import (UsageError, bounded, existing_path, found_shards, looks_local, model_source, output_path,
               torch_device)

DATASET_OPTIONS = ("data_files", "split", "streaming")  # apply to --dataset only


def check_args(args):
    """Paths, the one caption source (shards listed and opened) and the process share, before the text encoder
    loads."""
    from ..resumable import process_share

    given = [name for name, value in (("TSV", args.tsv), ("--shards", args.shards), ("--dataset", args.dataset))
             if value]
    if len(given) != 1:
        raise UsageError(f"give the captions' source, exactly one of TSV, --shards, --dataset; got {given or 'none'}")
    for name in DATASET_OPTIONS:
        if getattr(args, name) and not args.dataset:
            raise UsageError(f"--{name.replace('_', '-')} applies to --dataset only")
    for option, value in (("--caption-column", args.caption_column), ("--image-column", args.image_column)):
        if value is not None and args.shards:
            raise UsageError(f"{option} applies to a TSV or --dataset (shards hold img2dataset's txt captions)")
    if args.tsv:
        args.tsv = existing_path(args.tsv, "tsv", "file")
    if args.shards:
        args.shards = found_shards(args.shards, "--shards")
    if args.dataset and looks_local(args.dataset):
        args.dataset = existing_path(args.dataset, "--dataset")
    args.out_dir = output_path(args.out_dir, "out_dir", "folder")
    args.diffusion_model = model_source(args.diffusion_model, "--diffusion-model")
    if (args.process_index is None) != (args.num_processes is None):
        raise UsageError("give --process-index and --num-processes together")
    if args.num_processes is not None and args.process_index >= args.num_processes:
        raise UsageError(f"--process-index must be < --num-processes ({args.num_processes}), got {args.process_index}")
    if args.num_processes is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError("--process-index / --num-processes split separately started runs; under torchrun or "
                         "accelerate launch each process takes the launcher's rank, drop them")
    try:
        args.rank = process_share(args.process_index, args.num_processes)[0]
    except ValueError as err:
        raise UsageError(str(err)) from err


def read_captions(args) -> list[str]:
    """The captions of the source given, as ``gill-hf train`` reads it (:func:`.train.build_pairs`; empty ones
    left out)."""
    from ..training import CaptionImageDataset, StreamingCaptionDataset
    from .train import build_pairs

    if args.tsv:
        return CaptionImageDataset.from_tsv(args.tsv, caption_column=args.caption_column or "caption",
                                            image_column=args.image_column or "image").captions
    columns = {name: value for name, value in (("caption", args.caption_column), ("image", args.image_column))
               if value is not None}
    pairs = build_pairs({"shards": args.shards, "dataset": args.dataset, "data_files": args.data_files,
                         "split": args.split or "train", "streaming": args.streaming, "columns": columns or None,
                         "shuffle_buffer": 0}, seed=0, label="--dataset")
    return pairs.read_captions() if isinstance(pairs, StreamingCaptionDataset) else pairs.captions


def run(args) -> int:
    import torch

    from ..training.targets import DiffusionTextEncoder, precompute_targets

    check_args(args)
    captions = read_captions(args)
    if not captions:
        raise UsageError("the source holds no usable captions")
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if device.startswith("cuda") else torch.float32
    encoder = DiffusionTextEncoder(args.diffusion_model, device=device, dtype=dtype)
    out = precompute_targets(captions, args.out_dir, encoder, batch_size=args.batch_size, shard_size=args.shard_size,
                             dtype=args.dtype, process_index=args.process_index, num_processes=args.num_processes,
                             progress=not args.no_progress)
    if args.rank == 0:
        print(f"targets for {len(captions)} captions in {out}")
    return 0


def register(subparsers):
    parser = subparsers.add_parser("precompute-targets", help=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("tsv", nargs="?", help="caption<TAB>image TSV (CC3M format), or give --shards / --dataset")
    parser.add_argument("out_dir", help="folder of the target store (resumes if it exists)")
    parser.add_argument("--shards", nargs="+", metavar="SHARDS",
                        help="webdataset shards (as data.shards): brace patterns ('cc3m/{00000..00331}.tar', quoted), "
                             "folders of *.tar or tar files")
    parser.add_argument("--dataset", metavar="DATASET",
                        help="datasets.load_dataset name or folder (as data.dataset)")
    parser.add_argument("--data-files", nargs="+", default=None, help="--dataset's data_files (as data.data_files)")
    parser.add_argument("--split", default=None, help="--dataset's split (default: train)")
    parser.add_argument("--streaming", action="store_true", help="stream --dataset (as data.streaming)")
    parser.add_argument("--diffusion-model", required=True,
                        help="diffusers text-to-image model id or folder: SD 1.x / 2.x, SDXL, SD3 or Flux (its text encoders "
                             "give the targets)")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=64)
    parser.add_argument("--shard-size", type=bounded(int, 1), default=4096)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--caption-column", default=None,
                        help="the TSV's / dataset's caption column (default: caption; a dataset's: caption or text)")
    parser.add_argument("--image-column", default=None, help="the TSV's / dataset's image column (default: image)")
    parser.add_argument("--device", type=torch_device, default=None)
    parser.add_argument("--process-index", type=bounded(int, 0), default=None,
                        help="this run's share of the shards, for runs started separately (under torchrun / "
                             "accelerate launch the processes share them by rank)")
    parser.add_argument("--num-processes", type=bounded(int, 1), default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
