"""The web demo (``gill-hf demo`` / ``gill_hf.demo.build_demo``) on a tiny pipeline: the conversation prompt, the
streamed chat turn, sources resolved and rejected before any weights load, the ``/answer`` API through
gradio_client, and the page in a real headless Chromium (upload, send, streamed text, rendered image, errors)."""

import asyncio
import io
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gill_hf import GILLForConditionalGeneration, GILLPipeline, ImagePart, RetrievalIndex
from gill_hf.cli import main as cli_main
from gill_hf.demo import DemoSettings, build_demo
from gill_hf.demo import web
from gill_hf.demo.web import DemoSession, ShownImage, chat_turn, conversation_prompt
from gill_hf.diffusion_layouts import FAMILIES

pytestmark = pytest.mark.usefixtures("single_thread")

CHROMIUM = "/usr/bin/chromium"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "web_demo.png"
FAST = DemoSettings(force_image=True, force_image_after=2, max_new_tokens=14, num_inference_steps=2)
PROMPT_TEXT = "Show me the same dog at the beach."


def _values(settings: DemoSettings) -> tuple:
    """The Settings controls' values in their order on the page. A slider always holds a number: guidance None
    shows as the tiny SD 1.x pipeline's family default, which is what None means."""
    values = {name: getattr(settings, name) for name in web.DemoSettings.__dataclass_fields__}
    if values["guidance_scale"] is None:
        values["guidance_scale"] = FAMILIES["stable_diffusion"].guidance_scale
    return tuple(values.values())


def _direct(pipe, prompt, settings: DemoSettings):
    """The pipeline's own answer for ``prompt``: the reference the demo must show."""
    return pipe(prompt, **settings.pipeline_kwargs(pipe))


def _texts(parts) -> list[str]:
    return [p.strip() for p in parts if isinstance(p, str) and p.strip()]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, str]:
    """A dog photo stand-in, an undecodable "PNG" and a folder of retrieval candidates."""
    folder = tmp_path_factory.mktemp("demo_files")
    Image.new("RGB", (40, 36), "red").save(folder / "dog.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not an image at all")
    for colour in ("blue", "green", "white", "black"):
        Image.new("RGB", (40, 40), colour).save(folder / f"{colour}.png")
    return {"dog": str(folder / "dog.png"), "broken": str(folder / "broken.png"),
            "candidates": [str(folder / f"{c}.png") for c in ("blue", "green", "white", "black")]}


@pytest.fixture(scope="module")
def index(pipe, files):
    return RetrievalIndex.from_images(pipe.gill_model, files["candidates"], dtype=torch.float32)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(*args, **kwargs):
    """build_demo inside a running event loop (see ``served``)."""

    async def build():
        return build_demo(*args, **kwargs)

    return asyncio.run(build())


@contextmanager
def served(make_demo):
    """Build and launch a demo on 127.0.0.1 in a background thread; yields its URL. Gradio makes (and never
    closes) a new event loop for each of its locks when none is running, so it is built inside asyncio.run."""

    async def start():
        demo = make_demo()
        demo.launch(server_name="127.0.0.1", server_port=_free_port(), prevent_thread_lock=True, quiet=True)
        return demo

    demo = asyncio.run(start())
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def gradio_env():
    """Gradio's usage analytics off; its in-process monitoring summary (pandas, which warns on pandas 3) off."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("GRADIO_ANALYTICS_ENABLED", "False")
        mp.setenv("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(2 ** 62))
        yield


@pytest.fixture(scope="module")
def server(pipe, gradio_env):
    with served(lambda: build_demo(pipe, settings=FAST)) as url:
        yield url


# ---------------------------------------------------------------------------------------------- conversation
def test_conversation_prompt_keeps_every_image_where_it_was(pipe):
    dog, answer_image = Image.new("RGB", (8, 8), "red"), Image.new("RGB", (8, 8), "blue")
    turns = [{"role": "user", "parts": [ShownImage(dog, "dog.png"), "Where is it?"]},
             {"role": "assistant", "parts": [" at the beach", ShownImage(answer_image, "a.png"), " look"]},
             {"role": "user", "parts": ["And now?"]}]
    prompt = conversation_prompt(pipe.processor, turns)
    assert prompt[0] == "Q: " and prompt[1] is dog and prompt[3] is answer_image  # GILL's Q:/A: dialogue format
    assert prompt[2] == "Where is it?\nA:  at the beach" and prompt[4] == " look\nQ: And now?\nA:"
    assert len(prompt) == 5


def test_settings_are_checked_and_mapped_to_the_pipeline(pipe):
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0"):
        DemoSettings(top_p=0)
    with pytest.raises(ValueError, match="decision must be one of"):
        DemoSettings(decision="both")
    with pytest.raises(ValueError, match="max_new_tokens must be an integer, got 2.5"):
        DemoSettings(max_new_tokens=2.5)
    with pytest.raises(ValueError, match="guidance_scale must be a number, got 'high'"):
        DemoSettings(guidance_scale="high")
    with pytest.raises(ValueError, match="force_image must be True or False"):
        DemoSettings(force_image="yes")
    greedy = FAST.pipeline_kwargs(pipe)
    assert greedy["do_sample"] is False and "temperature" not in greedy and "top_p" not in greedy
    assert (greedy["force_image_after"], greedy["max_images"], greedy["num_inference_steps"]) == (2, 1, 2)
    sampled = DemoSettings(temperature=0.7, top_p=0.9, seed=5).pipeline_kwargs(pipe)
    assert (sampled["do_sample"], sampled["temperature"], sampled["top_p"]) == (True, 0.7, 0.9)
    assert "force_image_after" not in sampled
    assert torch.equal(torch.randn(3, generator=sampled["generator"]),
                       torch.randn(3, generator=torch.Generator().manual_seed(5)))


def test_chat_turn_streams_then_shows_the_answer_and_keeps_it_as_context(pipe, files, tmp_path):
    session = DemoSession(pipe, str(tmp_path))
    states = list(chat_turn(session, {"text": PROMPT_TEXT, "files": [files["dog"]]}, [], _values(FAST)))
    dog = Image.open(files["dog"]).convert("RGB")
    expected = _direct(pipe, ["Q: ", dog, PROMPT_TEXT + "\nA:"], FAST)
    words = " ".join(_texts(expected.parts))
    assert states[0][0] is None and states[0][1][-1]["content"] == ["…"]  # the message box empties at once
    streamed = [state[1][-1]["content"][0] for state in states[1:-1]]
    assert any(s.strip() and s != "…" and "diffusion step" not in s for s in streamed)  # text before the image
    assert "drawing: diffusion step 2/2" in streamed[-1]
    box, messages, history = states[-1]
    assert box is None and [m["role"] for m in messages] == ["user", "assistant"]
    answer = history[1]["parts"]
    shown = [p for p in answer if isinstance(p, ShownImage)]
    assert len(shown) == 1 and np.array_equal(np.asarray(shown[0].image), np.asarray(expected.images[0]))
    assert np.array_equal(np.asarray(Image.open(shown[0].file)), np.asarray(expected.images[0]))
    assert " ".join(_texts(answer)) == words and shown[0].caption.startswith("generated · P(retrieve) = 0.000")

    # the next turn sees the whole conversation, the answer's own image included
    states = list(chat_turn(session, {"text": "And now?", "files": []}, history, _values(FAST)))
    history = states[-1][2]
    context = ["Q: ", dog, PROMPT_TEXT + "\nA: " + expected.parts[0], expected.images[0],
               expected.parts[2] + "\nQ: And now?\nA:"]
    assert [type(p) for p in expected.parts] == [str, ImagePart, str]
    second = _direct(pipe, context, FAST)
    assert " ".join(_texts(history[3]["parts"])) == " ".join(_texts(second.parts))
    assert np.array_equal(np.asarray(history[3]["parts"][1].image), np.asarray(second.images[0]))


def test_user_errors_name_the_problem_before_any_work(pipe, files, tmp_path):
    session = DemoSession(pipe, str(tmp_path))
    with pytest.raises(ValueError, match="Empty message"):
        session.user_parts("  ", [])
    with pytest.raises(ValueError, match="Could not read the image broken.png: could not decode"):
        session.user_parts("What is it?", [files["dog"], {"path": files["broken"]}])
    with pytest.raises(ValueError, match=r"may not contain <\|image\|>"):
        session.user_parts("a <|image|> here", [])
    with pytest.raises(ValueError, match="needs a retrieval index"):
        session.check(DemoSettings(decision="retrieve"))
    parts = session.user_parts(" Where? ", [files["dog"]])
    assert parts[1] == "Where?" and np.array_equal(np.asarray(parts[0].image), np.asarray(Image.open(files["dog"])))
    assert [p.name for p in tmp_path.iterdir()] == [os.path.basename(parts[0].file)]  # the failed ones left none


def test_retrieved_images_show_their_probability_and_top_candidates(pipe, index, files, tmp_path):
    pipe.retrieval_index = index
    try:
        session = DemoSession(pipe, str(tmp_path))
        parts, out = session.answer(["Q: ", PROMPT_TEXT + "\nA:"], DemoSettings(
            decision="retrieve", force_image=True, max_new_tokens=10, num_inference_steps=2))
    finally:
        pipe.retrieval_index = None
    (part,) = [p for p in out.parts if isinstance(p, ImagePart)]
    (shown,) = [p for p in parts if isinstance(p, ShownImage)]
    assert part.kind == "retrieved" and len(part.candidates) == 3
    names = ", ".join(f"{os.path.basename(path)} ({score:.2f})" for path, score in part.candidates)
    assert shown.caption == f"retrieved · P(retrieve) = 1.000, forced · top candidates: {names}"
    assert np.array_equal(np.asarray(shown.image), np.asarray(Image.open(part.path).convert("RGB")))


# ---------------------------------------------------------------------------------------------- sources
@pytest.fixture
def no_weight_loads(monkeypatch):
    """Fail the test if any model or pipeline weights start loading."""

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the inputs were checked")

    for owner in (GILLForConditionalGeneration, GILLPipeline):
        monkeypatch.setattr(owner, "from_pretrained", refuse)
    monkeypatch.setattr(GILLPipeline, "from_gill", refuse)


def test_bad_sources_are_rejected_before_any_weights_load(tmp_path, no_weight_loads, index):
    with pytest.raises(FileNotFoundError, match="no such file or folder: ./missing-pipeline"):
        build_demo("./missing-pipeline")
    with pytest.raises(FileNotFoundError, match="index: no such folder"):
        build_demo("user/repo", index=str(tmp_path / "no-index"))
    with pytest.raises(ValueError, match="not a saved GILLPipeline .* or a GILL model folder"):
        build_demo(str(tmp_path))
    (tmp_path / "gill-adapter").mkdir()
    with pytest.raises(ValueError, match="incomplete quickstart folder"):
        build_demo(str(tmp_path))
    with pytest.raises(ValueError, match="device"):
        build_demo("user/repo", device="not-a-device")
    with pytest.raises(TypeError, match="pipeline_or_path must be"):
        build_demo(3)
    with pytest.raises(TypeError, match="settings must be a DemoSettings"):
        build_demo("user/repo", settings={"seed": 1})
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="torch sees no CUDA device"):
            build_demo("user/repo", device="cuda")


def _fake_quickstart(pipe, index, calls):
    def run_quickstart(out_dir, settings=None):
        """What the demo needs from the quickstart's output, written as the real one writes it."""
        calls.append(out_dir)
        pipe.gill_model.save_pretrained(os.path.join(out_dir, "gill-adapter"))
        index.save(os.path.join(out_dir, "retrieval_index"))
        Path(out_dir, "report.json").write_text(json.dumps({"settings": {"diffusion_steps": 3,
                                                                         "guidance_scale": 2.0}}))

    return run_quickstart


def test_no_argument_builds_the_quickstart_first_then_reuses_it(pipe, index, tmp_path, monkeypatch, gradio_env):
    from gill_hf.demo import quickstart

    calls = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(quickstart, "run_quickstart", _fake_quickstart(pipe, index, calls))
    demo_pipe, settings = web.load_demo_pipeline()
    assert calls == ["gill-quickstart"] and len(demo_pipe.retrieval_index) == len(index)
    assert (settings.num_inference_steps, settings.guidance_scale, settings.force_image) == (3, 2.0, True)
    assert settings.max_new_tokens == pipe.gill_model.config.num_img_tokens + 6
    assert demo_pipe.unet.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    for name, param in pipe.gill_model.adapter.state_dict().items():
        assert torch.equal(param, demo_pipe.gill_model.adapter.state_dict()[name].to(param.device)), name
    _build(index=str(tmp_path / "gill-quickstart" / "retrieval_index"))
    assert calls == ["gill-quickstart"]  # built once


def test_a_saved_pipeline_folder_and_an_index_folder(pipe, index, tmp_path, gradio_env):
    pipe.save_pretrained(tmp_path / "pipe")
    index.save(tmp_path / "index")
    loaded, settings = web.load_demo_pipeline(str(tmp_path / "pipe"), index=str(tmp_path / "index"), device="cpu")
    assert settings == DemoSettings() and loaded.retrieval_index.paths == index.paths
    assert torch.equal(loaded.retrieval_index.embeddings, index.embeddings)


def test_cli_passes_its_options_to_build_and_launch(monkeypatch, tmp_path, capsys):
    seen = {}

    class FakeDemo:
        def queue(self):
            return self

        def launch(self, **kwargs):
            seen["launch"] = kwargs

    def fake_build(source, index, device=None):
        seen["build"] = (source, index, device)
        return FakeDemo()

    monkeypatch.setattr(web, "build_demo", fake_build)
    (tmp_path / "idx").mkdir()
    assert cli_main(["demo", "user/gill", "--index", str(tmp_path / "idx"), "--device", "cpu", "--share",
                     "--server-name", "0.0.0.0", "--port", "7861"]) == 0
    assert seen == {"build": ("user/gill", str(tmp_path / "idx"), "cpu"),
                    "launch": {"share": True, "server_name": "0.0.0.0", "server_port": 7861}}
    assert cli_main(["demo"]) == 0
    assert seen["build"] == (None, None, None)
    assert seen["launch"] == {"share": False, "server_name": None, "server_port": None}
    seen.clear()
    assert cli_main(["demo", "./no-such-pipeline"]) == 2
    assert cli_main(["demo", "--index", str(tmp_path / "no-index")]) == 2
    assert cli_main(["demo", "--port", "0"]) == 2
    assert seen == {}  # nothing was built
    assert "no such file or folder: ./no-such-pipeline" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- served
def test_api_endpoint_answers_with_text_and_image_files(server, pipe, index, files):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(server, verbose=False)
    assert "/answer" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    text, gallery, details = client.predict(PROMPT_TEXT, [handle_file(files["dog"])], *_values(FAST),
                                            api_name="/answer")
    expected = _direct(pipe, ["Q: ", Image.open(files["dog"]).convert("RGB"), PROMPT_TEXT + "\nA:"], FAST)
    assert text == " ".join(_texts(expected.parts))
    assert len(gallery) == 1 and gallery[0]["caption"].startswith("generated · P(retrieve)")
    assert np.array_equal(np.asarray(Image.open(gallery[0]["image"])), np.asarray(expected.images[0]))
    assert details == [{"kind": "generated", "p_retrieve": 0.0, "decision": "gen", "forced": True, "source": None,
                        "score": None, "candidates": []}]
    pipe.retrieval_index = index
    try:
        retrieve = DemoSettings(decision="retrieve", force_image=True, max_new_tokens=10, num_inference_steps=2)
        _, gallery, details = client.predict(PROMPT_TEXT, [], *_values(retrieve), api_name="/answer")
        (part,) = [p for p in _direct(pipe, ["Q: ", PROMPT_TEXT + "\nA:"], retrieve).parts if isinstance(p, ImagePart)]
    finally:
        pipe.retrieval_index = None
    assert details[0]["kind"] == "retrieved" and details[0]["source"] == part.path
    assert details[0]["candidates"] == [{"source": path, "score": score} for path, score in part.candidates]
    assert np.array_equal(np.asarray(Image.open(gallery[0]["image"])), np.asarray(Image.open(part.path)))
    with pytest.raises(AppError, match="needs a retrieval index"):
        client.predict(PROMPT_TEXT, [], "retrieve", *_values(FAST)[1:], api_name="/answer")
    with pytest.raises(AppError, match="Could not read the image broken.png"):
        client.predict(PROMPT_TEXT, [handle_file(files["broken"])], *_values(FAST), api_name="/answer")


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (CI's .ci/run does)")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        tab = browser.new_page(viewport={"width": 1100, "height": 760})
        tab.goto(server)
        tab.wait_for_selector("#message textarea")
        yield tab
        browser.close()


BOT_IMAGES_READY = """n => {
    const images = [...document.querySelectorAll('#chat [data-testid="bot"] img')];
    return images.length >= n && images.every(i => i.complete && i.naturalWidth > 0);
}"""
RECORD_BOT_TEXT = """() => {
    window.snapshots = [];
    new MutationObserver(() => {
        const bots = document.querySelectorAll('#chat [data-testid="bot"]');
        const images = document.querySelectorAll('#chat [data-testid="bot"] img').length;
        window.snapshots.push({text: [...bots].map(b => b.innerText).join(' '), images});
    }).observe(document.querySelector('#chat'), {subtree: true, childList: true, characterData: true});
}"""


def _send(page, text: str, image: str | None = None):
    if image:
        page.locator("#message input[type=file]").set_input_files(image)
        page.wait_for_selector("#message img")  # the upload's thumbnail
    page.fill("#message textarea", text)
    page.press("#message textarea", "Enter")


def _bot_text(page) -> str:
    return " ".join(page.locator('#chat [data-testid="bot"]').all_inner_texts())


def _wait_for_answer(page):
    """Wait for the answer image to render; on a timeout, fail with what the page shows."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(BOT_IMAGES_READY, arg=1, timeout=60_000)
    except PlaywrightTimeout:
        pytest.fail(f"no rendered answer image after 60 s; the page shows {page.inner_text('body')[:3000]!r}")


def _toast(page, text: str):
    page.get_by_text(text).first.wait_for(timeout=20_000)


def test_browser_upload_send_streams_text_and_renders_the_image(page, pipe, files, tmp_path):
    page.evaluate(RECORD_BOT_TEXT)
    _send(page, PROMPT_TEXT, files["dog"])
    _wait_for_answer(page)
    expected = _direct(pipe, ["Q: ", Image.open(files["dog"]).convert("RGB"), PROMPT_TEXT + "\nA:"], FAST)
    shown = _bot_text(page)
    for piece in [*_texts(expected.parts), "generated · P(retrieve) = 0.000, forced"]:
        assert piece in shown
    snapshots = page.evaluate("window.snapshots")
    assert any(s["images"] == 0 and _texts(expected.parts)[0] in s["text"] for s in snapshots)  # streamed first
    natural = page.evaluate("""() => [...document.querySelectorAll('#chat [data-testid="bot"] img')]
                               .map(i => [i.naturalWidth, i.naturalHeight])""")
    assert natural == [list(expected.images[0].size)]
    assert np.array_equal(_shown_image(page), np.asarray(expected.images[0]))
    page.screenshot(path=str(tmp_path / "web_demo.png"), clip={"x": 0, "y": 0, "width": 1100, "height": 640})
    if os.environ.get("GILL_HF_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture on request only
        staged = SCREENSHOT.with_name(".web_demo.png.tmp")
        shutil.copyfile(tmp_path / "web_demo.png", staged)
        os.replace(staged, SCREENSHOT)


def _shown_image(page) -> np.ndarray:
    """The pixels of the (last) answer image as the browser fetched them."""
    src = page.locator('#chat [data-testid="bot"] img').last.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def _assert_shows(page, answer):
    _wait_for_answer(page)
    assert all(piece in _bot_text(page) for piece in _texts(answer.parts))
    assert np.array_equal(_shown_image(page), np.asarray(answer.images[0]))


def test_browser_user_errors_show_a_message_and_the_next_one_works(page, pipe, files):
    single_turn = _direct(pipe, ["Q: ", PROMPT_TEXT + "\nA:"], FAST)
    if not page.locator('#chat [data-testid="bot"] img').count():  # run alone: make a conversation first
        _send(page, PROMPT_TEXT, files["dog"])
        _wait_for_answer(page)
    page.click('#chat button[aria-label="Clear"]')  # the chat's own trash button: the conversation is gone
    page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"user\"]')")
    page.click("#message button.submit-button")  # nothing typed or uploaded
    _toast(page, "Empty message: type some text or upload an image.")
    page.get_by_label("retrieve", exact=True).check()
    _send(page, PROMPT_TEXT)
    _toast(page, "Decision 'retrieve' needs a retrieval index")
    page.get_by_label("generate", exact=True).check()
    page.click("#message button.submit-button")  # the message stayed in its box
    _assert_shows(page, single_turn)  # the first test's conversation is not in the context any more

    page.click("#clear")
    page.wait_for_function("() => !document.querySelector('#chat [data-testid=\"user\"]')")
    _send(page, "What is this?", files["broken"])
    _toast(page, "Could not read the image broken.png")
    assert page.locator('#chat [data-testid="user"]').count() == 0  # nothing half-added
    assert page.input_value("#message textarea") == "What is this?"  # the message stays, to be fixed
    page.click("#clear")
    page.wait_for_function("() => !document.querySelector('#message img')")
    _send(page, PROMPT_TEXT)
    _assert_shows(page, single_turn)
