"""``gill-hf generate PIPELINE --text ... --image FILE --text ... -o answer.html``: answer interleaved input and
write the answer as a self-contained HTML page (images inline beside the text)."""

import argparse
import os

from . import UsageError, bounded, existing_path, model_source, output_path
from ..atomic import write_text_atomic
from ..html_report import html_page, part_html


class _Interleaved(argparse.Action):
    """``--text`` / ``--image`` append ``(kind, value)`` to one list, keeping the order they were given in."""

    def __call__(self, parser, namespace, value, option_string=None):
        items = list(getattr(namespace, self.dest) or [])
        items.append((option_string.lstrip("-"), value))
        setattr(namespace, self.dest, items)


def render_html(prompt_items: list, parts: list) -> str:
    """The prompt and the answer (str and ImagePart items) as one HTML page."""
    prompt = "".join(part_html(item) for item in prompt_items)
    answer = "".join(part_html(item) for item in parts)
    return html_page("GILL answer", f"<h2>Input</h2><div class='turn'>{prompt}</div><h2>GILL</h2>"
                                    f"<div class='turn'>{answer}</div>")


def check_args(args):
    """Inputs, paths and option combinations, before the pipeline loads."""
    from ..pipeline_gill import RETRIEVAL_FOLDER

    if not args.inputs or not any(kind == "text" for kind, _ in args.inputs):
        raise UsageError("generate: give at least one --text (and optionally --image) in reading order")
    for kind, value in args.inputs:
        if kind == "image" and not value.startswith(("http://", "https://", "data:")):
            existing_path(value, "--image", "file")
    args.pipeline = model_source(args.pipeline, "pipeline")
    if args.index:
        args.index = existing_path(args.index, "--index", "folder")
    args.output = output_path(args.output, "--output", "file")
    saved_index = os.path.isdir(os.path.join(args.pipeline, RETRIEVAL_FOLDER))
    if args.decision == "retrieve" and not args.index and os.path.isdir(args.pipeline) and not saved_index:
        raise UsageError("--decision retrieve needs a retrieval index: pass --index or save one with the pipeline")
    if args.force_image_after is not None and args.force_image_after >= args.max_new_tokens:
        raise UsageError(f"--force-image-after {args.force_image_after} cannot be met within --max-new-tokens "
                         f"{args.max_new_tokens} (the image's [IMG] tokens count too)")


def run(args) -> int:
    import torch

    from ..pipeline_gill import GILLPipeline
    from ..processing_gill import load_image
    from ..retrieval import RetrievalIndex

    check_args(args)
    items = [value if kind == "text" else load_image(value) for kind, value in args.inputs]
    pipe = GILLPipeline.from_pretrained(args.pipeline)
    if args.index:
        pipe.retrieval_index = RetrievalIndex.load(args.index)
    generator = torch.Generator(device=pipe.device).manual_seed(args.seed)
    out = pipe(items, max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
               temperature=args.temperature if args.temperature > 0 else 1.0, top_p=args.top_p,
               force_image_after=args.force_image_after, gen_scale_factor=args.gen_scale_factor,
               decision=args.decision, num_inference_steps=args.steps, guidance_scale=args.guidance_scale,
               generator=generator)
    write_text_atomic(args.output, render_html(items, out.parts))
    print(f"wrote {args.output}: {sum(isinstance(p, str) for p in out.parts)} text and {len(out.images)} image parts")
    return 0


def register(subparsers):
    parser = subparsers.add_parser("generate", help=__doc__.splitlines()[0], description=__doc__)
    parser.add_argument("pipeline", help="a saved GILLPipeline folder or Hub repo id")
    parser.add_argument("--text", dest="inputs", action=_Interleaved, help="a text part (repeatable)")
    parser.add_argument("--image", dest="inputs", action=_Interleaved, help="an image file part (repeatable)")
    parser.add_argument("-o", "--output", default="answer.html")
    parser.add_argument("--index", help="a saved RetrievalIndex folder (enables retrieval and the decision)")
    parser.add_argument("--max-new-tokens", type=bounded(int, 1), default=32)
    parser.add_argument("--temperature", type=bounded(float, 0.0), default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=bounded(float, 0.0, 1.0, open_min=True), default=1.0)
    parser.add_argument("--force-image-after", type=bounded(int, 0), default=None,
                        help="force an image after this many text tokens")
    parser.add_argument("--gen-scale-factor", type=bounded(float, 0.0, open_min=True), default=1.0)
    parser.add_argument("--decision", choices=["auto", "generate", "retrieve"], default="auto")
    parser.add_argument("--steps", type=bounded(int, 1), default=50)
    parser.add_argument("--guidance-scale", type=bounded(float, 0.0), default=None,
                        help="default: the diffusion family's (7.5 SD 1.x / 2.x, 5.0 SDXL, 7.0 SD3, 3.5 Flux); a Flux "
                             "transformer without a guidance embedding (schnell) takes none")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run, inputs=[])
