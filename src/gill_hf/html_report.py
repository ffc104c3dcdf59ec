"""Small helpers for the self-contained HTML pages the commands write (images inlined as base64 PNG)."""

import base64
import html
import io

PAGE_STYLE = ("body{font-family:sans-serif;max-width:60em;margin:auto}figure{display:inline-block;margin:.5em}"
              "img{image-rendering:pixelated;width:192px}table{border-collapse:collapse}"
              "td,th{border:1px solid #ccc;padding:.2em .5em}.turn{border-left:3px solid #888;padding-left:1em;"
              "margin:1em 0}")


def image_tag(image, alt: str = "") -> str:
    """A PIL image as an ``<img>`` tag with the PNG bytes inlined."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return f'<img src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}" alt="{alt}">'


def html_page(title: str, body: str) -> str:
    """A complete HTML document with the shared style."""
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{PAGE_STYLE}</style>"
            f"</head><body>{body}</body></html>")


def part_html(item) -> str:
    """One part of an interleaved prompt or answer: ``str``, PIL image, or a pipeline ``ImagePart`` (with its
    kind, P(retrieve), decision and, for retrieved images, path and score) as HTML."""
    from PIL import Image

    if isinstance(item, str):
        return f"<p>{html.escape(item)}</p>"
    if isinstance(item, Image.Image):
        return f"<figure>{image_tag(item)}</figure>"
    caption = f"{item.kind} (P(retrieve)={item.decision.p_retrieve:.3f}, decision {item.decision.mode}"
    caption += ", forced)" if item.decision.forced else ")"
    if item.kind == "retrieved":
        caption += f" {html.escape(item.path or '')} score {item.score:.3f}"
    picture = image_tag(item.image) if isinstance(item.image, Image.Image) else \
        f'<a href="{html.escape(item.path or "")}">{html.escape(item.path or "")}</a>'
    return f"<figure>{picture}<figcaption>{caption}</figcaption></figure>"
