"""The web demo (``gill-hf demo``): a Gradio chat on a :class:`GILLPipeline`, as GILL's Space and MiniGPT-5's demo.

Upload images and type text; the answer streams its text and then shows its images inline, each generated or
retrieved, with P(retrieve) and, for retrieved ones, the top candidates. The whole conversation, the images of
earlier answers included, is the context of the next turn, rendered with the processor's chat template (GILL's
``Q: ... \\nA:`` dialogue format by default). The Settings panel holds the decision mode, forcing an image,
sampling, diffusion steps, guidance and the seed. One stateless API endpoint, ``/answer``, serves
``gradio_client`` callers (one prompt: its images, then its text).

``build_demo(source)`` takes a :class:`GILLPipeline`, a saved pipeline folder, a quickstart output folder, a GILL
model folder (its diffusion model comes from its config) or a Hub id; with no source, the quickstart's output
folder (``gill-quickstart``, built first if missing). Gradio is imported only here, when a demo is built.
"""

import json
import logging
import os
import queue
import shutil
import tempfile
import threading
import uuid
import weakref
from dataclasses import dataclass, fields
from typing import Literal

import torch
from PIL import Image
from transformers import TextStreamer

from ..chat_templates import IMAGE_TOKEN
from ..image_io import load_image, to_rgb
from ..modeling_gill import GILLForConditionalGeneration
from ..pipeline_gill import GILLPipeline, ImagePart
from ..retrieval import RetrievalIndex
from .quickstart import DEFAULT_OUT_DIR as DEFAULT_QUICKSTART_DIR

__all__ = ["DEFAULT_QUICKSTART_DIR", "DemoSettings", "build_demo", "conversation_prompt", "load_demo_pipeline"]

logger = logging.getLogger(__name__)

QUICKSTART_FILES = ("report.json", os.path.join("gill-adapter", "config.json"), "retrieval_index")
DECISIONS = ("auto", "generate", "retrieve")
MAX_SEED = 2 ** 31 - 1


@dataclass
class DemoSettings:
    """The answer settings, one control each in the Settings panel (these are its starting values).

    ``temperature`` 0 decodes greedily; ``force_image`` asks for one image after ``force_image_after`` text
    tokens; ``guidance_scale`` <= 1 turns classifier-free guidance off (for Flux it is the embedded guidance), None
    is the diffusion family's default (``GILLPipeline.default_guidance_scale``: 7.5 for SD 1.x / 2.x, 5.0 for
    SDXL...), and the only value a Flux transformer without a guidance embedding takes (the panel then hides it).
    """

    decision: Literal["auto", "generate", "retrieve"] = "auto"
    force_image: bool = False
    force_image_after: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 32
    guidance_scale: float | None = None
    num_inference_steps: int = 50
    seed: int = 0

    def __post_init__(self):
        self._check_types()
        self._check_ranges()

    def _check_types(self):
        for name in ("force_image_after", "max_new_tokens", "num_inference_steps", "seed"):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                setattr(self, name, int(value))  # UI numbers arrive as floats
            elif not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in ("temperature", "top_p", "guidance_scale"):
            if name == "guidance_scale" and self.guidance_scale is None:
                continue
            if not isinstance(getattr(self, name), (int, float)) or isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a number, got {getattr(self, name)!r}")
        if not isinstance(self.force_image, bool):
            raise ValueError(f"force_image must be True or False, got {self.force_image!r}")
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {DECISIONS}, got {self.decision!r}")

    def _check_ranges(self):
        checks = (("force_image_after", self.force_image_after >= 0, ">= 0"),
                  ("temperature", self.temperature >= 0, ">= 0"), ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
                  ("guidance_scale", self.guidance_scale is None or self.guidance_scale >= 0, ">= 0 or None"),
                  ("num_inference_steps", self.num_inference_steps >= 1, ">= 1"),
                  ("seed", 0 <= self.seed <= MAX_SEED, f"in [0, {MAX_SEED}]"))
        for name, ok, expected in checks:
            if not ok:
                raise ValueError(f"{name} must be {expected}, got {getattr(self, name)!r}")

    def pipeline_kwargs(self, pipe: GILLPipeline) -> dict:
        """Keyword arguments of ``pipe(...)`` for these settings (a fresh seeded generator each call)."""
        kwargs = dict(decision=self.decision, max_new_tokens=self.max_new_tokens,
                      guidance_scale=self.guidance_scale, num_inference_steps=self.num_inference_steps,
                      generator=torch.Generator(device=pipe.device).manual_seed(self.seed), num_candidates=3)
        if self.temperature > 0:
            kwargs.update(do_sample=True, temperature=self.temperature, top_p=self.top_p)
        else:
            kwargs["do_sample"] = False
        if self.force_image:
            kwargs.update(force_image_after=self.force_image_after, max_images=1)
        return kwargs


# ---------------------------------------------------------------------------------------------- loading
def _is_quickstart_folder(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, name)) for name in QUICKSTART_FILES)


def _looks_local(source: str) -> bool:
    """A path rather than a Hub id (``user/name``): it starts like a path or has more than one separator."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or os.sep != "/" and os.sep in source


def _source_kind(source: str) -> str:
    """"pipeline", "quickstart", "model" or "hub" for a local folder / Hub id; raises for anything else."""
    if os.path.isdir(source):
        if os.path.isfile(os.path.join(source, "model_index.json")):
            return "pipeline"
        if os.path.isdir(os.path.join(source, "gill-adapter")):
            if not _is_quickstart_folder(source):
                raise ValueError(f"{source} is an incomplete quickstart folder (it needs "
                                 f"{', '.join(QUICKSTART_FILES)}); rerun `gill-hf quickstart --out {source}`")
            return "quickstart"
        if os.path.isfile(os.path.join(source, "config.json")):
            return "model"
        raise ValueError(f"{source} is not a saved GILLPipeline (no model_index.json), a quickstart output folder "
                         f"(no gill-adapter/) or a GILL model folder (no config.json)")
    if os.path.exists(source):
        raise ValueError(f"{source} is a file; expected a pipeline folder, a quickstart folder or a Hub id")
    if _looks_local(source) or os.path.exists(os.path.dirname(source) or "\0"):
        raise FileNotFoundError(f"no such file or folder: {source}")
    return "hub"


def _check_index(index) -> RetrievalIndex | None:
    """``index``: None, a RetrievalIndex or a saved index folder (opened memory-mapped)."""
    if index is None or isinstance(index, RetrievalIndex):
        return index
    if not isinstance(index, (str, os.PathLike)):
        raise TypeError(f"index must be a RetrievalIndex or a folder path, got {type(index).__name__}")
    path = os.path.expanduser(os.fspath(index))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"index: no such folder: {path}")
    return RetrievalIndex.load(path)


def _check_device(device) -> torch.device | None:
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device: {err}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch sees no CUDA device")
    return device


def _quickstart_pipeline(folder: str, index: RetrievalIndex | None = None) -> GILLPipeline:
    """The quickstart's pipeline; its own retrieval index unless ``index`` replaces it (then not opened)."""
    model = GILLForConditionalGeneration.from_pretrained(os.path.join(folder, "gill-adapter")).eval()
    index = index if index is not None else RetrievalIndex.load(os.path.join(folder, "retrieval_index"))
    return GILLPipeline.from_gill(model, retrieval_index=index)


def _quickstart_settings(folder: str, pipe: GILLPipeline) -> DemoSettings:
    """The quickstart's own answer settings: one image right away, then a few words; its diffusion settings."""
    with open(os.path.join(folder, "report.json")) as handle:
        used = json.load(handle).get("settings", {})
    return DemoSettings(force_image=True, max_new_tokens=pipe.gill_model.config.num_img_tokens + 6,
                        num_inference_steps=int(used.get("diffusion_steps", 8)),
                        guidance_scale=float(used.get("guidance_scale", 4.0)))


def load_demo_pipeline(pipeline_or_path=None, index=None, device=None) -> tuple[GILLPipeline, DemoSettings]:
    """Resolve the demo's pipeline (see the module docstring) and its starting settings.

    Every argument is checked before any weights load; ``index`` (a RetrievalIndex or folder) replaces the
    pipeline's own; ``device`` moves a pipeline (default: CUDA when available, for pipelines loaded here).
    """
    device = _check_device(device)
    index = _check_index(index)
    settings = DemoSettings()
    if isinstance(pipeline_or_path, GILLPipeline):
        pipe = pipeline_or_path
    elif pipeline_or_path is None or isinstance(pipeline_or_path, (str, os.PathLike)):
        source = os.path.expanduser(os.fspath(pipeline_or_path)) if pipeline_or_path is not None \
            else DEFAULT_QUICKSTART_DIR
        if pipeline_or_path is None and not _is_quickstart_folder(source):
            from .quickstart import run_quickstart

            logger.warning("no quickstart output in %s: running `gill-hf quickstart` first (a few minutes)", source)
            run_quickstart(source)
        kind = _source_kind(source)
        if kind == "quickstart":
            pipe = _quickstart_pipeline(source, index)
            settings = _quickstart_settings(source, pipe)
        elif kind == "model":
            pipe = GILLPipeline.from_gill(GILLForConditionalGeneration.from_pretrained(source).eval())
        else:
            pipe = GILLPipeline.from_pretrained(source, **({"retrieval_index": index} if index is not None else {}))
        pipe.set_progress_bar_config(disable=True)  # the demo shows its own progress
        device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        raise TypeError(f"pipeline_or_path must be a GILLPipeline, a folder path, a Hub id or None, got "
                        f"{type(pipeline_or_path).__name__}")
    if index is not None:
        pipe.retrieval_index = index
    if device is not None:
        pipe.to(device)
    return pipe, settings


# ---------------------------------------------------------------------------------------------- conversation
@dataclass
class ShownImage:
    """An image of the conversation: ``image`` (RGB, the model's input next turn), ``file`` (its PNG for the
    page) and ``caption`` (the line shown under it, for answer images)."""

    image: Image.Image
    file: str
    caption: str | None = None


def conversation_prompt(processor, turns: list[dict]) -> list:
    """``turns`` ``[{"role": "user" | "assistant", "parts": [str | PIL image | ShownImage, ...]}, ...]`` -> one
    interleaved prompt (str and PIL parts) for the pipeline: the processor's chat template with its generation
    prompt, every image where it was (GILL's template: ``["Q: ", image, "text\\nA:"]``)."""
    messages, images = [], []
    for turn in turns:
        content = []
        for part in turn["parts"]:
            if isinstance(part, str):
                content.append({"type": "text", "text": part})
            else:
                content.append({"type": "image"})
                images.append(part.image if isinstance(part, ShownImage) else part)
        messages.append({"role": turn["role"], "content": content})
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True)
    bos = processor.tokenizer.bos_token
    if bos and rendered.startswith(bos):
        rendered = rendered[len(bos):]  # the parts API adds BOS itself
    pieces = rendered.split(IMAGE_TOKEN)
    if len(pieces) != len(images) + 1:
        raise ValueError(f"the chat template rendered {len(pieces) - 1} image markers for {len(images)} images")
    prompt = [pieces[0]]
    for image, piece in zip(images, pieces[1:]):
        prompt += [image, piece]
    return [part for part in prompt if not isinstance(part, str) or part]


def image_caption(part: ImagePart) -> str:
    """The line under an answer image: its kind, P(retrieve) and, for a retrieved image, the top candidates."""
    forced = ", forced" if part.decision.forced else ""
    caption = f"{part.kind} · P(retrieve) = {part.decision.p_retrieve:.3f}{forced}"
    if part.kind == "retrieved":
        names = ", ".join(f"{os.path.basename(path)} ({score:.2f})" for path, score in part.candidates)
        caption += f" · top candidates: {names}"
    return caption


def image_details(part: ImagePart) -> dict:
    """JSON-ready description of an answer image (the API endpoint's third output). Retrieved paths are under
    ``source``: gradio_client would take a ``path`` key for a file to download."""
    return {"kind": part.kind, "p_retrieve": part.decision.p_retrieve, "decision": part.decision.mode,
            "forced": part.decision.forced, "source": part.path, "score": part.score,
            "candidates": [{"source": path, "score": score} for path, score in part.candidates]}


class _QueueStreamer(TextStreamer):
    """Puts each finalized piece of answer text on ``events`` as ``("text", piece)``."""

    def __init__(self, tokenizer, events: queue.Queue):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.events = events

    def on_finalized_text(self, text: str, stream_end: bool = False):
        if text:
            self.events.put(("text", text))


class DemoSession:
    """The demo's model side, independent of Gradio: validates a message, builds the prompt, runs the pipeline
    (optionally streaming) and turns the answer into conversation parts with PNG files under ``image_dir``."""

    def __init__(self, pipe: GILLPipeline, image_dir: str):
        self.pipe, self.image_dir = pipe, image_dir
        self.lock = threading.Lock()  # one pipeline call at a time (chat and API share the model)

    def show(self, image: Image.Image, caption: str | None = None) -> ShownImage:
        image = to_rgb(image)
        file = os.path.join(self.image_dir, f"{uuid.uuid4().hex}.png")
        image.save(file)
        return ShownImage(image, file, caption)

    def user_parts(self, text: str | None, files: list) -> list:
        """The user's message -> its parts (images first, then the text); raises ValueError for an empty
        message, an image that cannot be decoded or text holding the image marker."""
        text = (text or "").strip()
        files = list(files or [])
        if not text and not files:
            raise ValueError("Empty message: type some text or upload an image.")
        if IMAGE_TOKEN in text:
            raise ValueError(f"The message may not contain {IMAGE_TOKEN}: upload images instead.")
        images = []
        for file in files:
            path = file.get("path") if isinstance(file, dict) else os.fspath(file)
            try:
                images.append(load_image(path))
            except (ValueError, OSError) as err:
                raise ValueError(f"Could not read the image {os.path.basename(path)}: {err}") from None
        return [self.show(image) for image in images] + ([text] if text else [])  # files once all decode

    def check(self, settings: DemoSettings):
        if settings.decision == "retrieve" and self.pipe.retrieval_index is None:
            raise ValueError("Decision 'retrieve' needs a retrieval index: start the demo with --index DIR "
                             "(index=...), or choose auto / generate.")

    def answer(self, prompt: list, settings: DemoSettings, events: queue.Queue | None = None) -> tuple:
        """Run the pipeline on ``prompt`` -> (the answer parts: str and ShownImage, the pipeline output).
        With ``events``, text pieces arrive there as ``("text", str)`` and diffusion steps as
        ``("step", done, total)`` while it runs."""
        self.check(settings)
        kwargs = settings.pipeline_kwargs(self.pipe)
        if events is not None:
            kwargs["streamer"] = _QueueStreamer(self.pipe.processor.tokenizer, events)

            def on_step(pipe, i, t, tensors):
                events.put(("step", i + 1, len(pipe.scheduler.timesteps)))
                return {}

            kwargs["callback_on_step_end"] = on_step
        with self.lock:
            out = self.pipe(prompt, **kwargs)
        parts = []
        for part in out.parts:
            if isinstance(part, str):
                parts.append(part)
            elif part.image is not None:
                parts.append(self.show(part.image, image_caption(part)))
            else:  # a retrieved candidate that is not a local file (e.g. a URL of the original release)
                parts.append(f"[{image_caption(part)}: {part.path}]")
        return parts, out


# ---------------------------------------------------------------------------------------------- page
def chat_messages(turns: list[dict]) -> list[dict]:
    """Conversation turns -> Gradio Chatbot messages (text, image files and, under answer images, captions)."""
    messages = []
    for turn in turns:
        content = []
        for part in turn["parts"]:
            if isinstance(part, str):
                if part.strip():
                    content.append(part.strip())
            else:
                content.append({"path": part.file})
                if part.caption:
                    content.append(part.caption)
        messages.append({"role": turn["role"], "content": content or [""]})
    return messages


def _settings(*values) -> DemoSettings:
    return DemoSettings(**dict(zip([f.name for f in fields(DemoSettings)], values)))


def _describe(pipe: GILLPipeline) -> str:
    llm = pipe.gill_model.config.text_model_name_or_path or pipe.gill_model.config.text_config.model_type
    index = pipe.retrieval_index
    found = f"{len(index)} retrieval candidates" if index is not None else \
        "no retrieval index (auto generates every image; start with --index DIR to retrieve)"
    return f"LLM `{os.path.basename(str(llm))}` on {pipe.device.type}; {found}."  # UNet or transformer families


def build_demo(pipeline_or_path=None, index=None, *, device=None, settings: DemoSettings | None = None,
               title: str = "GILL"):
    """The demo as a ``gr.Blocks`` (call ``.launch()``); see the module docstring for ``pipeline_or_path``.

    Args:
        index: a RetrievalIndex or a saved index folder, replacing the pipeline's own.
        device: where the pipeline runs ("cpu", "cuda", ...); default: CUDA when available for pipelines loaded
            here, a given pipeline stays where it is.
        settings: the Settings panel's starting values (default: the quickstart's for its folder, else
            :class:`DemoSettings`' defaults).
    """
    try:
        import gradio as gr
    except ImportError:
        raise ImportError("the web demo needs gradio: pip install 'gill_hf[demo]'") from None
    if settings is not None and not isinstance(settings, DemoSettings):
        raise TypeError(f"settings must be a DemoSettings, got {type(settings).__name__}")
    pipe, defaults = load_demo_pipeline(pipeline_or_path, index, device)
    settings = settings or defaults
    image_dir = tempfile.mkdtemp(prefix="gill-demo-")
    session = DemoSession(pipe, image_dir)

    with gr.Blocks(title=title) as demo:
        gr.Markdown(f"# {title}: images and text in, images and text out\n{_describe(pipe)}")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", elem_id="chat", height=480, render_markdown=False)
                message = gr.MultimodalTextbox(file_types=["image"], file_count="multiple", sources=["upload"],
                                               placeholder="Type a message, upload images, press Enter",
                                               show_label=False, elem_id="message")
                clear = gr.Button("Clear", elem_id="clear")
            with gr.Column(scale=1), gr.Accordion("Settings", open=True):
                controls = [
                    gr.Radio(list(DECISIONS), value=settings.decision, label="Decision",
                             info="auto: the decision head picks retrieve or generate per image"),
                    gr.Checkbox(value=settings.force_image, label="Force an image"),
                    gr.Slider(0, 64, value=settings.force_image_after, step=1, label="...after this many tokens"),
                    gr.Slider(0, 2, value=settings.temperature, step=0.05, label="Temperature",
                              info="0 = greedy"),
                    gr.Slider(0.05, 1, value=settings.top_p, step=0.05, label="Top-p"),
                    gr.Slider(1, 256, value=settings.max_new_tokens, step=1, label="Max new tokens"),
                    gr.Slider(0, 20, value=pipe.default_guidance_scale if settings.guidance_scale is None
                              else settings.guidance_scale, step=0.5, label="Guidance scale")
                    if pipe.guidance_applies else gr.Number(value=None, visible=False, label="Guidance scale"),
                    # a transformer without a guidance embedding takes none: a hidden None
                    gr.Slider(1, 100, value=settings.num_inference_steps, step=1, label="Diffusion steps"),
                    gr.Number(value=settings.seed, precision=0, minimum=0, maximum=MAX_SEED, label="Seed"),
                ]
        turns = gr.State([])
        with gr.Column(visible=False):  # the /answer API endpoint's own inputs and outputs
            api_text, api_images = gr.Textbox(), gr.File(file_count="multiple", file_types=["image"])
            api_answer, api_gallery, api_details = gr.Textbox(), gr.Gallery(format="png"), gr.JSON()
            api_button = gr.Button()

        def respond(value, history, *values, progress=gr.Progress()):
            yield from chat_turn(session, value, history, values, progress)

        def api_answer_fn(text, files, *values):
            """One prompt (its images, then its text) -> answer text, answer images with captions, details."""
            try:
                current = _settings(*values)
                session.check(current)
                user = {"role": "user", "parts": session.user_parts(text, files)}
                parts, out = session.answer(conversation_prompt(pipe.processor, [user]), current)
            except ValueError as err:
                raise gr.Error(str(err)) from None
            answer_text = " ".join(p.strip() for p in parts if isinstance(p, str) and p.strip())
            gallery = [(p.file, p.caption) for p in parts if isinstance(p, ShownImage)]
            details = [image_details(p) for p in _image_parts(out)]
            return answer_text, gallery, details

        message.submit(respond, [message, turns, *controls], [message, chatbot, turns], api_visibility="private",
                       concurrency_id="gill", show_progress="minimal")
        clear.click(lambda: (None, [], []), None, [message, chatbot, turns], api_visibility="private")
        chatbot.clear(lambda: [], None, turns, api_visibility="private")  # the chat's own trash button
        api_button.click(api_answer_fn, [api_text, api_images, *controls], [api_answer, api_gallery, api_details],
                         api_name="answer", concurrency_id="gill")
    weakref.finalize(demo, shutil.rmtree, image_dir, True)
    return demo


def chat_turn(session: DemoSession, value: dict | None, history: list, values: tuple, progress=None):
    """One chat turn, a generator of page states ``(message box, chat messages, turns)``: the user's message
    and the streaming answer text (and diffusion steps), then the answer with its images. A problem the user
    can fix (empty message, an image that cannot be decoded, a setting) is a ``gr.Warning`` and the page goes
    back to where it was, the message still in its box. ``values``: the Settings controls, as DemoSettings'
    fields; ``progress``: a ``gr.Progress`` for the diffusion steps."""
    import gradio as gr

    value = value or {}
    try:
        settings = _settings(*values)
        session.check(settings)
        user = {"role": "user", "parts": session.user_parts(value.get("text"), value.get("files"))}
        prompt = conversation_prompt(session.pipe.processor, [*history, user])
    except ValueError as err:
        gr.Warning(str(err))
        yield value, chat_messages(history), history
        return
    events = queue.Queue()
    worker = threading.Thread(target=_run, args=(session, prompt, settings, events), daemon=True)
    worker.start()
    shown, text = chat_messages([*history, user]), ""
    yield None, shown + [{"role": "assistant", "content": ["…"]}], history
    while (event := events.get())[0] in ("text", "step"):
        if event[0] == "text":
            text += event[1]
            yield None, shown + [{"role": "assistant", "content": [text.strip() or "…"]}], history
        else:
            done, total = event[1:]
            if progress is not None:
                progress((done, total), desc="Diffusion steps")
            status = f"{text.strip()}\n\n*drawing: diffusion step {done}/{total}*"
            yield None, shown + [{"role": "assistant", "content": [status]}], history
    worker.join()
    if event[0] == "error":
        gr.Warning(event[1])
        yield value, chat_messages(history), history
        return
    history = [*history, user, {"role": "assistant", "parts": event[1]}]
    yield None, chat_messages(history), history


def _image_parts(out) -> list[ImagePart]:
    return [p for p in out.parts if isinstance(p, ImagePart)]


def _run(session: DemoSession, prompt: list, settings: DemoSettings, events: queue.Queue):
    """The worker thread of a chat turn: ``("done", parts)`` or ``("error", message)`` on ``events`` last."""
    try:
        parts, _ = session.answer(prompt, settings, events)
        events.put(("done", parts))
    except (ValueError, TypeError) as err:
        events.put(("error", str(err)))
    except Exception as err:  # a failed answer must leave the page usable; the server log keeps the traceback
        logger.exception("the demo's answer failed")
        events.put(("error", f"The answer failed ({type(err).__name__}: {err})."))
