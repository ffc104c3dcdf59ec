"""GILLProcessor as a transformers processor: chat templates, text= / images= with <|image|> placeholders, image
sources (files, URLs on a loopback server, base64, arrays), padding / truncation and the context window.

Expected ids are computed independently: the tokenizer's own ``apply_chat_template`` (or a hand-written prompt)
tokenized whole by the tokenizer, each ``<|image|>`` id then expanded to k copies by hand; expected pixels are the
image processor's on the same PIL images."""

import base64
import io
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

from gill_hf import GILLProcessor
from gill_hf.chat_templates import GILL_CHAT_TEMPLATE, MINIGPT5_CHAT_TEMPLATE
from gill_hf.processing_gill import IMAGE_TOKEN
from gill_hf.tiny import build_tiny_chat_tokenizer, build_tiny_tokenizer, tiny_image_processor

K = 4  # num_visual_tokens


@pytest.fixture(scope="module")
def chat_processor():
    """An instruct-style backbone: Llama-3-like chat template, model_max_length 512."""
    return GILLProcessor(tiny_image_processor(), build_tiny_chat_tokenizer())


@pytest.fixture(scope="module")
def plain_processor():
    """A base-LM tokenizer without a chat template (like OPT's)."""
    return GILLProcessor(tiny_image_processor(), build_tiny_tokenizer())


def _image(colour="red", size=(20, 16)):
    image = Image.new("RGB", size, colour)
    image.putpixel((3, 2), (10, 200, 30))
    return image


def _png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def expected_ids(proc, prompt: str, bos: bool) -> list[int]:
    """Tokenize the whole prompt, then expand each <|image|> id to k copies (and prepend BOS if asked)."""
    ids = proc.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    expanded = [t for i in ids for t in ([i] * K if i == proc.image_token_id else [i])]
    return [proc.tokenizer.bos_token_id] * bos + expanded


def pixels(proc, images) -> torch.Tensor:
    return proc.image_processor(images, return_tensors="pt")["pixel_values"]


CONVERSATION_IMAGES = [_image("red"), _image("blue"), _image("green")]


def conversation():
    """system, user with an image, assistant answering with an image, user with an image."""
    red, blue, green = CONVERSATION_IMAGES
    return [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "image": red}, {"type": "text", "text": "a red square"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "here it is blue"},
                                          {"type": "image", "image": blue}]},
        {"role": "user", "content": [{"type": "text", "text": "and this"}, {"type": "image", "image": green},
                                     {"type": "text", "text": "?"}]},
    ]


# String-content version of conversation(), written by hand: what the LLM's own template is given.
FLAT_CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "<|image|>a red square"},
    {"role": "assistant", "content": "here it is blue<|image|>"},
    {"role": "user", "content": "and this<|image|>?"},
]


# ---------------------------------------------------------------- chat templates
def test_chat_template_is_the_tokenizers_own(chat_processor):
    proc = chat_processor
    prompt = proc.apply_chat_template(conversation(), add_generation_prompt=True)
    reference = proc.tokenizer.apply_chat_template(FLAT_CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert prompt == reference and prompt.startswith("<s><|start_header_id|>system")
    out = proc.apply_chat_template(conversation(), add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt")
    assert out["input_ids"][0].tolist() == expected_ids(proc, reference, bos=False)  # the template wrote BOS once
    assert out["attention_mask"].all() and out["input_ids"].shape == out["attention_mask"].shape
    assert torch.equal(out["pixel_values"], pixels(proc, CONVERSATION_IMAGES))  # assistant's image at its place
    ids_only = proc.apply_chat_template(conversation(), add_generation_prompt=True, tokenize=True)
    assert torch.equal(ids_only, out["input_ids"])
    text = proc.batch_decode(out["input_ids"])[0]
    assert text == reference.replace(IMAGE_TOKEN, IMAGE_TOKEN * K)
    assert proc.decode(out["input_ids"][0], skip_special_tokens=True).startswith("system")


def test_gill_default_template_marks_the_roles(plain_processor):
    proc = plain_processor
    assert proc.chat_template is None  # nothing saved; GILL's default renders
    prompt = proc.apply_chat_template(conversation(), add_generation_prompt=True)
    assert prompt == ("Be brief.\n\nQ: <|image|>a red square\nA: here it is blue<|image|>\n"
                      "Q: and this<|image|>?\nA:")
    out = proc.apply_chat_template(conversation(), add_generation_prompt=True, tokenize=True, return_dict=True)
    assert out["input_ids"][0].tolist() == expected_ids(proc, prompt, bos=True)  # BOS opens the first text
    assert torch.equal(out["pixel_values"], pixels(proc, CONVERSATION_IMAGES))
    # the list-of-parts API renders a conversation with the same template (no generation prompt)
    parts = proc(conversation())
    assert parts["input_ids"][0].tolist() == expected_ids(proc, prompt[:-len("A:")], bos=True)
    with pytest.raises(Exception, match="roles system, user and assistant, not tool"):
        proc.apply_chat_template([{"role": "tool", "content": "x"}])


def test_minigpt5_template_by_name(plain_processor, chat_processor):
    for proc in (plain_processor, chat_processor):  # a built-in name beats the tokenizer's own template
        prompt = proc.apply_chat_template(conversation(), chat_template="minigpt5", add_generation_prompt=True)
        assert prompt == ("Be brief.###Human: <Img><|image|></Img>a red square ###Assistant: here it is blue"
                          "<Img><|image|></Img> ###Human: and this<Img><|image|></Img>? ###Assistant:")
    out = plain_processor.apply_chat_template(conversation(), chat_template="minigpt5", add_generation_prompt=True,
                                              tokenize=True, return_dict=True)
    assert out["input_ids"][0].tolist() == expected_ids(plain_processor, prompt, bos=True)
    as_default = GILLProcessor(tiny_image_processor(), build_tiny_tokenizer(), chat_template="minigpt5")
    assert as_default.chat_template == MINIGPT5_CHAT_TEMPLATE
    assert as_default.apply_chat_template(conversation(), add_generation_prompt=True) == prompt


def test_templates_are_saved_and_reloaded(chat_processor, plain_processor, tmp_path):
    chat_processor.save_pretrained(tmp_path / "own")
    assert (tmp_path / "own" / "chat_template.jinja").read_text() == chat_processor.tokenizer.chat_template
    again = GILLProcessor.from_pretrained(tmp_path / "own")
    assert again.chat_template == chat_processor.chat_template
    kwargs = dict(add_generation_prompt=True, tokenize=True, return_dict=True)
    a, b = chat_processor.apply_chat_template(conversation(), **kwargs), again.apply_chat_template(conversation(),
                                                                                                     **kwargs)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])

    named = GILLProcessor(tiny_image_processor(), build_tiny_tokenizer(),
                          chat_template={"default": GILL_CHAT_TEMPLATE, "story": "{{ messages[0]['content'] }}!"})
    named.save_pretrained(tmp_path / "named")
    assert (tmp_path / "named" / "additional_chat_templates" / "story.jinja").is_file()
    again = GILLProcessor.from_pretrained(tmp_path / "named")
    assert again.chat_template == named.chat_template
    assert again.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="story") == "hi!"

    plain_processor.save_pretrained(tmp_path / "plain")  # the GILL default is code, not a file
    assert not (tmp_path / "plain" / "chat_template.jinja").exists()
    assert GILLProcessor.from_pretrained(tmp_path / "plain").apply_chat_template(
        conversation()) == plain_processor.apply_chat_template(conversation())


def test_batched_conversations_pad_on_the_left(chat_processor):
    proc = chat_processor
    short = [{"role": "user", "content": "hi"}]
    out = proc.apply_chat_template([conversation(), short], add_generation_prompt=True, tokenize=True,
                                   return_dict=True, processor_kwargs={"padding_side": "left"})
    first = expected_ids(proc, proc.tokenizer.apply_chat_template(FLAT_CONVERSATION, tokenize=False,
                                                                   add_generation_prompt=True), bos=False)
    second = expected_ids(proc, proc.tokenizer.apply_chat_template(short, tokenize=False,
                                                                    add_generation_prompt=True), bos=False)
    pad = proc.tokenizer.pad_token_id
    assert out["input_ids"].tolist() == [first, [pad] * (len(first) - len(second)) + second]
    assert out["attention_mask"][1].tolist() == [0] * (len(first) - len(second)) + [1] * len(second)
    assert torch.equal(out["pixel_values"], pixels(proc, CONVERSATION_IMAGES))


def test_chat_errors_name_the_part(chat_processor):
    bad = [{"role": "user", "content": [{"type": "text", "text": "x"}, {"type": "video", "video": "v.mp4"}]}]
    with pytest.raises(ValueError, match="conversation 0, message 0, part 1: unknown content part type 'video'"):
        chat_processor.apply_chat_template(bad, tokenize=True)
    bare = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x"}]}]
    assert chat_processor.apply_chat_template(bare).count(IMAGE_TOKEN) == 1  # fine as a prompt string ...
    with pytest.raises(ValueError, match="conversation 0 has an image part without"):  # ... but not to encode
        chat_processor.apply_chat_template(bare, tokenize=True)
    given = chat_processor.apply_chat_template(bare, tokenize=True, return_dict=True,
                                               processor_kwargs={"images": [_image()]})
    assert torch.equal(given["pixel_values"], pixels(chat_processor, [_image()]))
    broken = [{"role": "user", "content": [{"type": "image", "base64": base64.b64encode(b"nope!!").decode()}]}]
    with pytest.raises(ValueError, match=r"sample 0, image 0 \(dict\): could not decode image"):
        chat_processor.apply_chat_template(broken, tokenize=True)


# ---------------------------------------------------------------- text= / images=
def test_placeholders_in_text_place_the_images(plain_processor):
    proc = plain_processor
    red, blue = _image("red"), _image("blue")
    text = "a dog <|image|> at the beach <|image|>"
    out = proc(text=text, images=[red, blue])
    assert out["input_ids"][0].tolist() == expected_ids(proc, text, bos=True)
    assert torch.equal(out["pixel_values"], pixels(proc, [red, blue]))
    assert torch.equal(proc(["a dog ", red, " at the beach ", blue])["input_ids"], out["input_ids"])
    first = proc(text="<|image|> a dog", images=red)["input_ids"][0].tolist()  # image first: BOS after it
    assert first == [proc.image_token_id] * K + [proc.tokenizer.bos_token_id] + proc.tokenizer(
        " a dog", add_special_tokens=False)["input_ids"]
    no_bos = proc(text="a dog", add_special_tokens=False)["input_ids"][0].tolist()
    assert no_bos == proc.tokenizer("a dog", add_special_tokens=False)["input_ids"]
    # a batch: flat images are taken in placeholder order, or given per text
    texts = ["<|image|> one", "two <|image|> <|image|>"]
    flat = proc(text=texts, images=[red, blue, red])
    nested = proc(text=texts, images=[[red], [blue, red]])
    assert torch.equal(flat["input_ids"], nested["input_ids"]) and torch.equal(flat["pixel_values"],
                                                                               nested["pixel_values"])
    assert torch.equal(flat["pixel_values"], pixels(proc, [red, blue, red]))
    # the list-of-parts API still reads a typed placeholder as text
    assert proc.image_token_id not in proc(["<|image|>"])["input_ids"][0].tolist()


def test_placeholder_count_mismatch_is_an_error(plain_processor):
    proc = plain_processor
    with pytest.raises(ValueError, match="holds 1 '<\\|image\\|>' placeholders but 2 images"):
        proc(text="a <|image|>", images=[_image(), _image()])
    with pytest.raises(ValueError, match="holds 0 '<\\|image\\|>' placeholders but 1 images"):
        proc(text="no slot here", images=_image())
    with pytest.raises(ValueError, match="text 1 holds 2 '<\\|image\\|>' placeholders but 1 images"):
        proc(text=["<|image|>", "<|image|><|image|>"], images=[[_image()], [_image()]])
    with pytest.raises(ValueError, match="holds 1 '<\\|image\\|>' placeholders but 0 images"):
        proc(text="a <|image|>")
    with pytest.raises(TypeError, match="text 1 must be a str, got int"):
        proc(text=["fine", 3])


# ---------------------------------------------------------------- image sources
def test_every_image_source_gives_the_same_pixels(plain_processor, tmp_path):
    proc = plain_processor
    image = _image("purple", size=(24, 18))
    path = tmp_path / "photo.png"
    image.save(path)
    data = _png(image)
    encoded = base64.b64encode(data).decode()
    hwc = np.array(image)
    sources = {
        "str path": str(path), "os.PathLike": path, "PIL": image, "bytes": data, "base64": encoded,
        "data URI": "data:image/png;base64," + encoded, "numpy HWC uint8": hwc,
        "numpy CHW float": hwc.transpose(2, 0, 1) / 255.0, "torch CHW uint8": torch.from_numpy(hwc).permute(2, 0, 1),
        "torch HWC float": torch.from_numpy(hwc / 255.0).float(), "part path": {"type": "image", "path": str(path)},
        "part image": {"type": "image", "image": image}, "part base64": {"type": "image", "base64": encoded},
        "part url (data:)": {"type": "image", "url": "data:image/png;base64," + encoded},
    }
    want = pixels(proc, [image])
    for name, source in sources.items():
        got = proc(text="look <|image|>", images=source)["pixel_values"]
        assert torch.equal(got, want), name
    assert torch.equal(proc(text="<|image|>", images=str(path))["pixel_values"], want)  # one str = one image
    assert torch.equal(proc(["look", path])["pixel_values"], want)  # parts API: paths too
    small = _image("teal", size=(4, 8))  # W 4, H 8: (3, 8, 4) and (8, 4, 3) both look like channels
    small_hwc = np.array(small)
    for source in (torch.from_numpy(small_hwc).permute(2, 0, 1), small_hwc):  # torch reads CHW, numpy HWC
        assert torch.equal(proc(text="<|image|>", images=source)["pixel_values"], pixels(proc, [small]))
    grey = proc(text="<|image|>", images=np.full((6, 5), 128, np.uint8))["pixel_values"]
    assert torch.equal(grey, pixels(proc, [Image.new("RGB", (5, 6), (128, 128, 128))]))


def test_bad_images_are_named(plain_processor, tmp_path):
    proc = plain_processor
    cases = [
        ("missing.png", ValueError, r"sample 0, image 0 \(str\): could not decode image 'missing.png': no such file"),
        (np.zeros((2, 3, 8, 8), np.uint8), ValueError, r"image 0 \(ndarray\): image array of shape \(2, 3, 8, 8\)"),
        (np.zeros((5, 8, 8), np.uint8), ValueError, "no channel dimension of size 1, 3 or 4"),
        (np.full((8, 8, 3), 2.0), ValueError, r"must lie in \[0, 1\], got the range \[2, 2\]"),
        (torch.zeros(3, 8, 8, dtype=torch.int64), ValueError, "dtype must be uint8 or float"),
        ({"type": "image", "url": "ftp://x/y.png"}, ValueError, "'url' must be an http"),
        ({"type": "image", "path": "a.png", "url": "http://127.0.0.1/x"}, ValueError, "exactly one of"),
        ("imagesfromthedog/photo", ValueError,
         r"could not decode image 'imagesfromthedog/photo': no such file, and not base64"),
        (3.5, TypeError, "images must be one image .* got float"),
        ([3.5], TypeError, r"image 0 \(float\): cannot read an image from a float"),
    ]
    for source, error, message in cases:
        with pytest.raises(error, match=message):
            proc(text="<|image|>", images=source)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match=r"sample 1, image 0 \(PosixPath\): could not decode image .*broken.png"):
        proc(text=["<|image|>", "<|image|>"], images=[_image(), bad])
    with pytest.raises(ValueError, match=r"sample 0, part 1 \(dict\): unknown content part type 'audio'"):
        proc(["hi", {"type": "audio", "audio": "a.wav"}])
    with pytest.raises(TypeError, match=r"sample 0, part 0 \(int\)"):
        proc([7])


class _ImageServer(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/slow":
            self.server.release.wait(10)  # answer nothing until the test is over
            return
        if self.path != "/dog.png":
            self.send_error(404, "Not Found")
            return
        body = self.server.png
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def image_server():
    """A loopback HTTP server on 127.0.0.1: /dog.png, /slow (never answers), anything else 404."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ImageServer)
    server.daemon_threads = True
    server.png, server.release = _png(_image("orange")), threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    with pytest.MonkeyPatch.context() as mp:
        for name in ("NO_PROXY", "no_proxy"):
            mp.setenv(name, "127.0.0.1")
        thread.start()
        yield f"http://127.0.0.1:{server.server_address[1]}"
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_url_images_from_a_loopback_server(chat_processor, image_server):
    proc = chat_processor
    want = pixels(proc, [_image("orange")])
    messages = [{"role": "user", "content": [{"type": "image", "url": f"{image_server}/dog.png"},
                                             {"type": "text", "text": "what is it"}]}]
    out = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert torch.equal(out["pixel_values"], want)
    assert torch.equal(proc(text="<|image|>", images=f"{image_server}/dog.png")["pixel_values"], want)
    openai_style = [{"role": "user",
                     "content": [{"type": "image_url", "image_url": {"url": f"{image_server}/dog.png"}}]}]
    assert torch.equal(proc.apply_chat_template(openai_style, tokenize=True, return_dict=True)["pixel_values"], want)
    with pytest.raises(ValueError, match=r"sample 0, image 0 \(str\): could not fetch image .*/nope.png.*HTTP 404"):
        proc(text="<|image|>", images=f"{image_server}/nope.png")


def test_url_timeout_is_a_clear_error(image_server):
    proc = GILLProcessor(tiny_image_processor(), build_tiny_tokenizer(), image_timeout=0.3)
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"},
                                             {"type": "image", "url": f"{image_server}/slow"}]}]
    with pytest.raises(ValueError, match=r"sample 0, image 0 \(dict\): could not fetch image .*/slow.*within 0.3 s"):
        proc.apply_chat_template(messages, tokenize=True)


# ---------------------------------------------------------------- padding / truncation / context window
def test_padding_options_as_in_tokenizers(plain_processor):
    proc = plain_processor
    texts = ["a dog", "a big red dog at the beach <|image|>"]
    images = [_image()]
    longest = proc(text=texts, images=images)
    n0, n1 = (int(m.sum()) for m in longest["attention_mask"])
    assert longest["input_ids"].shape == (2, n1) and n0 < n1
    padded = proc(text=texts, images=images, padding="max_length", max_length=40)
    assert padded["input_ids"].shape == (2, 40)
    assert torch.equal(padded["input_ids"][:, :n1], longest["input_ids"])
    assert (padded["input_ids"][:, n1:] == proc.tokenizer.pad_token_id).all()
    assert n1 % 8 and proc(text=texts, images=images, pad_to_multiple_of=8)["input_ids"].shape == (2, -(-n1 // 8) * 8)
    ragged = proc(text=texts, images=images, padding=False, return_tensors=None)
    assert [len(r) for r in ragged["input_ids"]] == [n0, n1] and ragged["attention_mask"][0] == [1] * n0
    with pytest.raises(ValueError, match="padding=False gives rows of lengths"):
        proc(text=texts, images=images, padding=False)
    as_np = proc(text=texts, images=images, return_tensors="np")
    assert isinstance(as_np["input_ids"], np.ndarray) and np.array_equal(as_np["input_ids"], longest["input_ids"])
    assert np.array_equal(as_np["pixel_values"], longest["pixel_values"].numpy())

    left_tokenizer = build_tiny_tokenizer()
    left_tokenizer.padding_side = "left"
    left = GILLProcessor(tiny_image_processor(), left_tokenizer)(text=texts, images=images)
    assert left["attention_mask"][0].tolist() == [0] * (n1 - n0) + [1] * n0
    assert torch.equal(left["input_ids"][0, n1 - n0:], longest["input_ids"][0, :n0])
    with pytest.raises(ValueError, match="padding_side must be 'left' or 'right'"):
        proc(text=texts, images=images, padding_side="middle")


def _long_story(n_steps=6):
    text = "".join(f"step {i} the dog went to the park and saw a big red ball <|image|> " for i in range(n_steps))
    return text, [_image(c) for c in ["red", "blue", "green", "white", "black", "gray"][:n_steps]]


def test_context_window_error_names_length_and_limit(chat_processor):
    text, images = _long_story()
    full = len(expected_ids(chat_processor, text, bos=True))
    with pytest.raises(ValueError, match=f"prompt 0 is {full} tokens long .* more than the limit of 60 tokens "
                                         r"\(max_length\).*truncation=True"):
        chat_processor(text=text, images=images, max_length=60)
    long_text = "the dog went to the park " * 120
    n = len(expected_ids(chat_processor, long_text, bos=True))
    assert n > 512
    with pytest.raises(ValueError, match=f"is {n} tokens long .* limit of 512 tokens \\(tokenizer.model_max_length"):
        chat_processor(text=long_text)
    with pytest.raises(ValueError, match="more than the limit of 60"):
        chat_processor(text=text, images=images, max_length=60, truncation="do_not_truncate")
    with pytest.raises(ValueError, match="truncation=True needs max_length"):
        GILLProcessor(tiny_image_processor(), build_tiny_tokenizer())(text=long_text, truncation=True)


def test_truncation_cuts_from_the_left_keeping_images_whole(chat_processor):
    proc = chat_processor
    text, images = _long_story()
    full = expected_ids(proc, text, bos=True)
    runs = [i for i in range(len(full)) if full[i] == proc.image_token_id and full[i - 1] != proc.image_token_id]
    for limit in range(30, 70):
        with pytest.warns(UserWarning, match=f"prompt 0: {len(full)} tokens cut from the left to .*limit {limit}"):
            out = proc(text=text, images=images, truncation=True, max_length=limit)
        ids = out["input_ids"][0].tolist()
        assert ids[0] == proc.tokenizer.bos_token_id and len(ids) <= limit  # the leading BOS is kept
        cut = len(full) - (len(ids) - 1)
        assert ids[1:] == full[cut:]  # the end of the prompt, unchanged
        naive_cut = len(full) - (limit - 1)
        assert (len(ids) < limit) == any(start < naive_cut < start + K for start in runs)  # shorter only there
        kept = [j for j, start in enumerate(runs) if start >= cut]
        assert ids.count(proc.image_token_id) == K * len(kept)
        assert torch.equal(out["pixel_values"], pixels(proc, [images[j] for j in kept]))
    with pytest.warns(UserWarning, match="cut from the right to 37 .* 5 of its 6 images dropped"):
        right = proc(text=text, images=images, truncation=True, max_length=37, truncation_side="right")
    ids = right["input_ids"][0].tolist()
    assert ids == full[:len(ids)] and len(ids) <= 37 and ids.count(proc.image_token_id) % K == 0
    with pytest.raises(ValueError, match="truncation_side must be"):
        proc(text=text, images=images, truncation=True, truncation_side="middle")


def test_truncation_never_splits_an_image(chat_processor):
    proc = chat_processor
    red, blue = _image("red"), _image("blue")
    text = "a dog <|image|><|image|> at the beach"
    full = expected_ids(proc, text, bos=True)
    tail = proc.tokenizer(" at the beach", add_special_tokens=False)["input_ids"]
    limit = 1 + len(tail) + K + 2  # the cut falls two placeholders into the first image
    with pytest.warns(UserWarning, match="1 of its 2 images dropped"):
        out = proc(text=text, images=[red, blue], truncation=True, max_length=limit)
    assert out["input_ids"][0].tolist() == [proc.tokenizer.bos_token_id] + [proc.image_token_id] * K + tail
    assert torch.equal(out["pixel_values"], pixels(proc, [blue]))
    assert len(full) > limit


def test_context_length_and_check_context(chat_processor, tmp_path):
    assert chat_processor.context_limit == 512
    chat_processor.check_context(500, max_new_tokens=12)
    with pytest.raises(ValueError, match="500 tokens long \\+ 13 new tokens, more than the context window of 512"):
        chat_processor.check_context(500, max_new_tokens=13)
    unknown = GILLProcessor(tiny_image_processor(), build_tiny_tokenizer())
    assert unknown.context_limit is None
    unknown.check_context(10 ** 9)  # no window known: no check
    windowed = GILLProcessor(tiny_image_processor(), build_tiny_tokenizer(), context_length=16)
    with pytest.raises(ValueError, match="limit of 16 tokens \\(the processor's context_length\\)"):
        windowed(text="the dog went to the park " * 5)
    windowed.save_pretrained(tmp_path)
    assert GILLProcessor.from_pretrained(tmp_path).context_limit == 16
