"""``gill-hf precompute-targets``: encode every caption once with the diffusion text encoder(s) into a target store.

Resumable (a killed run continues at the missing shards) and shardable: ``torchrun --nproc_per_node N -m gill_hf.cli
precompute-targets ...`` (or ``accelerate launch``) splits the shards between N processes, one GPU each."""

import os

from . import UsageError, bounded, existing_path, model_source, output_path, torch_device


def check_args(args):
    """Paths and the process share, before the text encoder loads."""
    from ..resumable import process_share

    args.tsv = existing_path(args.tsv, "tsv", "file")
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


def run(args) -> int:
    import torch

    from ..training.data import CaptionImageDataset
    from ..training.targets import DiffusionTextEncoder, precompute_targets

    check_args(args)
    captions = CaptionImageDataset.from_tsv(args.tsv, caption_column=args.caption_column,
                                            image_column=args.image_column).captions
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
    parser = subparsers.add_parser("precompute-targets", help=__doc__.split("\n\n")[0])
    parser.add_argument("tsv", help="caption<TAB>image TSV (CC3M format)")
    parser.add_argument("out_dir", help="folder of the target store (resumes if it exists)")
    parser.add_argument("--diffusion-model", required=True,
                        help="diffusers text-to-image model id or folder: SD 1.x / 2.x, SDXL, SD3 or Flux (its text encoders "
                             "give the targets)")
    parser.add_argument("--batch-size", type=bounded(int, 1), default=64)
    parser.add_argument("--shard-size", type=bounded(int, 1), default=4096)
    parser.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--device", type=torch_device, default=None)
    parser.add_argument("--process-index", type=bounded(int, 0), default=None,
                        help="this run's share of the shards, for runs started separately (under torchrun / "
                             "accelerate launch the processes share them by rank)")
    parser.add_argument("--num-processes", type=bounded(int, 1), default=None)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)
