"""``gill-hf demo [MODEL_OR_PIPELINE] [--index DIR]``: the web demo, a Gradio chat that answers uploaded images
and text with text and generated or retrieved images (``gill_hf.demo.build_demo``). With no argument it serves
the quickstart's output folder (``gill-quickstart``), running the quickstart first if that folder is missing."""

import asyncio

from . import bounded, existing_path, model_source, torch_device


def check_args(args):
    """Paths before anything loads (the library checks the rest, also before loading)."""
    if args.model_or_pipeline is not None:
        args.model_or_pipeline = model_source(args.model_or_pipeline, "model_or_pipeline")
    if args.index:
        args.index = existing_path(args.index, "--index", "folder")


def run(args) -> int:
    from ..demo import web

    check_args(args)

    async def build():  # gradio makes (and never closes) an event loop per lock when none is running
        return web.build_demo(args.model_or_pipeline, args.index, device=args.device).queue()

    asyncio.run(build()).launch(share=args.share, server_name=args.server_name, server_port=args.port)
    return 0


def register(subparsers):
    parser = subparsers.add_parser("demo", help=__doc__.splitlines()[0], description=__doc__)
    parser.add_argument("model_or_pipeline", nargs="?", default=None,
                        help="a saved GILLPipeline folder, a quickstart output folder, a GILL model folder or a Hub "
                             "repo id (default: the quickstart's output, built first if missing)")
    parser.add_argument("--index", help="a saved RetrievalIndex folder (replaces the pipeline's own)")
    parser.add_argument("--device", type=torch_device,
                        help="where the pipeline runs: cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--server-name", help="address to listen on (default 127.0.0.1; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=bounded(int, 1, 65535),
                        help="port to listen on (default: 7860 or the next free one)")
    parser.set_defaults(func=run)
