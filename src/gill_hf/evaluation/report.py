"""Writing an evaluation run: ``results.json``, ``results.md`` (the paper's table layout) and ``samples.html``."""

import json
import os

from PIL import Image

from ..atomic import write_text_atomic
from ..html_report import html_page, image_tag, part_html
from ..processing_gill import load_image, to_rgb

THUMBNAIL = 256  # px, longest side of the images inlined in samples.html


def cell(stats: dict | None, digits: int = 3) -> str:
    """``{"mean", "std"}`` -> ``"0.641 ± 0.003"``; missing -> ``"-"``."""
    if stats is None:
        return "-"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def markdown_table(rows: list[dict], metrics: list[tuple[str, str]], settings: list[str], digits: int = 3) -> str:
    """Rows = models, columns = each metric (key, label) for each setting, as paper Tables 1 and 2."""
    models = list(dict.fromkeys(row["model"] for row in rows))
    by_key = {(row["model"], row["setting"]): row for row in rows}
    header = ["Model"] + [f"{label} ({setting})" for _, label in metrics for setting in settings]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model in models:
        cells = [cell(by_key.get((model, setting), {}).get(key), digits) for key, _ in metrics for setting in settings]
        lines.append("| " + " | ".join([model] + cells) + " |")
    return "\n".join(lines) + "\n"


def rows_table(rows: list[dict], metrics: list[tuple[str, str]], digits: int = 3) -> str:
    """One line per (model, input) row, one column per metric (key, label), as MiniGPT-5's tables."""
    header = ["Model", "Input"] + [label for _, label in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        lines.append("| " + " | ".join([row["model"], row["setting"]] + [cell(row.get(key), digits)
                                                                         for key, _ in metrics]) + " |")
    return "\n".join(lines) + "\n"


def thumbnail(image) -> Image.Image:
    image = to_rgb(load_image(image)).copy()
    image.thumbnail((THUMBNAIL, THUMBNAIL))
    return image


def figure(image, caption: str) -> str:
    return f"<figure>{image_tag(thumbnail(image), caption)}<figcaption>{caption}</figcaption></figure>"


def sample_section(title: str, context: list, target, outputs: list[tuple[str, str]]) -> str:
    """One example: its input (text and context images), the ground truth and each row's image ``(label, path)``."""
    prompt = "".join(part_html(thumbnail(p) if not isinstance(p, str) else p) for p in context)
    images = figure(target, "ground truth") + "".join(figure(path, label) for label, path in outputs)
    return f"<h3>{title}</h3><div class='turn'>{prompt}</div><div>{images}</div>"


def write_report(out_dir: str | os.PathLike, results: dict, markdown: str, sections: list[str], title: str):
    """``results.json``, ``results.md`` and ``samples.html`` in ``out_dir``, each written atomically."""
    out_dir = os.fspath(out_dir)
    write_text_atomic(os.path.join(out_dir, "results.json"), json.dumps(results, indent=2) + "\n")
    write_text_atomic(os.path.join(out_dir, "results.md"), f"# {title}\n\n{markdown}")
    write_text_atomic(os.path.join(out_dir, "samples.html"), html_page(title, f"<h1>{title}</h1>" + "".join(sections)))
