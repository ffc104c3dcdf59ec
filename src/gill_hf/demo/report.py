"""The quickstart's outputs: the held-out numbers table, the printed summary, the loss plot, report.html and
report.json (all written atomically)."""

import html
import json

from PIL import Image

from ..atomic import atomic_path, write_text_atomic
from ..html_report import html_page, image_tag, part_html
from ..training.trainer import LOSS_FIELDS

LOSS_LABELS = {"loss": "total", "caption_loss": "l_c (captioning)", "img_token_loss": "l_p ([IMG] tokens)",
               "gen_loss": "l_g (generation)", "ret_loss": "l_r (retrieval)"}
SAMPLE_IMAGES = 6  # held-out captions shown in the image grid


def results_rows(results: dict) -> list[tuple[str, str, str]]:
    """(metric, held-out value, baselines) rows, as printed, put in the HTML table and the model card."""
    ret, cos, img, dec = (results[k] for k in ("retrieval", "embedding_cosine", "image_correctness", "decision"))
    base = dec["baselines"]
    return [
        ("retrieval Recall@1 (caption -> held-out image)", f"{ret['recall_at_1']:.3f}", f"chance {ret['chance']:.3f}"),
        ("mapper output vs text-encoder embedding, per-token cosine (higher is better)", f"{cos['matched']:.3f}",
         f"mismatched caption {cos['mismatched_caption']:.3f}, untrained adapter {cos['untrained_adapter']:.3f}"),
        ("image from GILL's [IMG] states shows the scene (probe: colour, shape and place)",
         f"{img['gill']['scene']:.3f}", f"image from the true caption {img['caption']['scene']:.3f}, untrained adapter "
         f"{img['untrained_adapter']['scene']:.3f}, random {img['random']['scene']:.3f}"),
        ("retrieve-vs-generate decision, macro-F1", f"{dec['macro_f1']:.3f}",
         f"always retrieve {base['always_retrieve']:.3f}, always generate {base['always_generate']:.3f}, "
         f"random {base['random']:.3f}"),
    ]


def summary_text(report: dict) -> str:
    """The lines the command prints: the held-out numbers beside their baselines, the reload check, the files."""
    results, paths = report["results"], report["paths"]
    rows = results_rows(results)
    width = max(len(name) for name, _, _ in rows)
    lines = [f"held-out results ({results['num_heldout']} scenes never seen in training; "
             f"{results['decision']['counts']['ret']} + {results['decision']['counts']['gen']} decision prompts):"]
    lines += [f"  {name:<{width}}  {value:>7}   vs {baseline}" for name, value, baseline in rows]
    story = results["stories"]
    lines.append(f"story steps: {story['decision_as_expected']}/{story['steps']} decisions as expected, "
                 f"{story['retrieved_right_image']}/{story['retrieved']} retrievals found the step's own image")
    lines.append(f"reload identical: {report['reload']['identical']} "
                 f"({', '.join(k for k, ok in report['reload']['checks'].items() if ok)})")
    lines.append(f"time: {sum(report['timings_s'].values()):.0f} s ({', '.join(f'{k} {v:.0f} s' for k, v in report['timings_s'].items())})")
    lines += [f"  {name:<12} {path}" for name, path in paths.items()]
    return "\n".join(lines)


def plot_losses(history: list[dict], path: str):
    """Total loss and the four Eq. 5 terms against the optimizer step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [entry["step"] for entry in history]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    axes[0].plot(steps, [entry["loss"] for entry in history], marker=".")
    axes[0].set(title="total loss", xlabel="step")
    for name in LOSS_FIELDS:
        if all(name in entry for entry in history):
            axes[1].plot(steps, [entry[name] for entry in history], marker=".", label=LOSS_LABELS[name])
    axes[1].set(title="loss terms", xlabel="step")
    axes[1].legend()
    fig.tight_layout()
    with atomic_path(path, ".png") as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    plt.close(fig)


def answer_record(parts: list, prompt: dict) -> dict:
    """An answer's parts as JSON: text strings, and images with kind, decision, P(retrieve), score, path and
    whether a retrieval found the story's own image."""
    record = {"story": prompt["story"], "prompt": prompt["context"], "expected": prompt["expected"],
              "truth": prompt["truth"], "parts": []}
    for part in parts:
        if isinstance(part, str):
            record["parts"].append({"text": part})
            continue
        record["parts"].append({"kind": part.kind, "decision": part.decision.mode,
                                "p_retrieve": part.decision.p_retrieve, "score": part.score, "path": part.path,
                                "retrieved_truth": part.path == prompt["truth"] if part.kind == "retrieved"
                                else None})
    return record


def _table(header: list[str], rows: list) -> str:
    cells = "".join(f"<tr>{''.join(f'<td>{html.escape(str(c))}</td>' for c in row)}</tr>" for row in rows)
    return f"<table><tr>{''.join(f'<th>{html.escape(h)}</th>' for h in header)}</tr>{cells}</table>"


def _stories_html(prompts: list[dict], answers: list) -> str:
    """Each story as its steps in order: the step's text (the input), then the answer's image and text."""
    blocks = {}
    for prompt, parts in zip(prompts, answers):
        expect = "in the index: expect retrieve" if prompt["expected"] == "ret" else \
            "not in the index: expect generate"
        right = [f"<p><i>retrieved the step's own image: {p.path == prompt['truth']}</i></p>" for p in parts
                 if not isinstance(p, str) and p.kind == "retrieved"]
        blocks.setdefault(prompt["story"], []).append(
            f"<div class='turn'><b>{html.escape(' '.join(prompt['context']))}</b> <i>({expect})</i>"
            f"{''.join(part_html(p) for p in parts)}{''.join(right)}</div>")
    return "".join(f"<h3>story {i}</h3>{''.join(steps)}" for i, steps in blocks.items())


def _images_html(images: dict, captions: list[str]) -> str:
    """The first held-out captions with the image each kind of conditioning drew and the probe's reading of it."""
    kinds = ["caption", "gill", "untrained_adapter"]
    rows = []
    for i in range(min(SAMPLE_IMAGES, len(captions))):
        cells = []
        for kind in kinds:
            pixels, readings = images[kind]
            picture = Image.fromarray((pixels[i].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
            cells.append(f"<td>{image_tag(picture)}<br><small>probe: {html.escape(' '.join(readings[i]))}</small></td>")
        rows.append(f"<tr><td>{html.escape(captions[i])}</td>{''.join(cells)}</tr>")
    header = "".join(f"<th>{k}</th>" for k in ["held-out caption", "from the true caption", "from GILL",
                                                  "from the untrained adapter"])
    return f"<table><tr>{header}</tr>{''.join(rows)}</table>"


def render_html(report: dict, prompts: list[dict], answers: list, images: dict, captions: list[str],
                plot_path: str) -> str:
    """The self-contained report page (images inlined)."""
    dec = report["results"]["decision"]
    with Image.open(plot_path) as plot:
        plot_tag = image_tag(plot.copy(), "loss curves")
    body = [
        "<style>.plot img{width:100%;image-rendering:auto}</style><h1>gill-hf quickstart</h1>",
        "<p>GILL on tiny backbones that know the toy world (an OPT pretrained on toy stories, a Stable Diffusion "
        "trained on the shapes; both frozen), trained on the procedural shapes corpus. Every number is measured on "
        "held-out scenes the adapter never saw in training, beside the baseline it has to beat. Generated images "
        "are judged by an independent probe trained on rendered scenes.</p>",
        "<h2>Held-out numbers</h2>", _table(["metric", "held-out value", "baselines"], results_rows(report["results"])),
        f"<p>reload identical: <b>{report['reload']['identical']}</b> "
        f"({html.escape(json.dumps(report['reload']['checks']))})</p>",
        "<h2>Training loss</h2>", f"<div class='plot'>{plot_tag}</div>",
        "<h2>Interleaved answers to held-out stories</h2>", _stories_html(prompts, answers),
        "<h2>Images from GILL's [IMG] states vs from the caption itself (same seed), read by the probe</h2>",
        _images_html(images, captions),
        f"<h2>Decision on held-out prompts (threshold {dec['threshold']})</h2>",
        _table(["prompt", "label", "P(retrieve)"], [(e["prompt"], e["label"], e["p_retrieve"])
                                                   for e in dec["examples"]]),
        "<h2>Settings and timings</h2>", _table(["setting", "value"], sorted(report["settings"].items())),
        _table(["step", "seconds"], report["timings_s"].items()),
    ]
    return html_page("gill-hf quickstart", "".join(body))


def write_reports(report: dict, prompts: list[dict], answers: list, images: dict, captions: list[str]):
    """loss_curves.png, report.html and report.json (with the answers as JSON) at ``report["paths"]``."""
    paths = report["paths"]
    plot_losses(report["loss_history"], paths["loss_plot"])
    report["answers"] = [answer_record(parts, prompt) for parts, prompt in zip(answers, prompts)]
    write_text_atomic(paths["report_html"], render_html(report, prompts, answers, images, captions,
                                                        paths["loss_plot"]))
    write_text_atomic(paths["report_json"], json.dumps(report, indent=1))
