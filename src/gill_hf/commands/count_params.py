"""``gill-hf count-params``: trainable parameters of the paper configuration, from configs only (no weights)."""


def run(args) -> int:
    from ..configuration_gill import gill_paper_config
    from ..modeling_gill import count_adapter_parameters

    counts = count_adapter_parameters(gill_paper_config(mapper_type=args.mapper_type))
    width = max(len(k) for k in counts)
    for name, value in counts.items():
        print(f"{name:<{width}}  {value:>12,}")
    print(f"(paper: ~50M trainable; OPT-6.7B, CLIP ViT-L/14, SD-1.5 widths, mapper {args.mapper_type})")
    return 0


def register(subparsers):
    parser = subparsers.add_parser("count-params", help=__doc__)
    parser.add_argument("--mapper-type", default="gill_mapper",
                        choices=["gill_mapper", "linear", "mlp", "transformer_encoder"])
    parser.set_defaults(func=run)
