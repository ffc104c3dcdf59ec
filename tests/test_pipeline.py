"""GILLPipeline end to end on the tiny Stable Diffusion: determinism, retrieve vs generate, precomputed embeddings,
CFG negatives, callbacks, save/load, the CLI, and bad inputs."""

import json
import math
import threading

import numpy as np
import pytest
import torch
from conftest import seeded
from diffusers import StableDiffusionPipeline
from PIL import Image

from gill_hf import GILLPipeline, ImagePart, RetrievalIndex
from gill_hf.cli import main as cli_main

PROMPT = ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the same dog at the beach."]
FAST = dict(max_new_tokens=14, force_image_after=2, max_images=1, eos_token_id=[], num_inference_steps=2)


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def index(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("candidates")
    paths = []
    for i, colour in enumerate(("red", "blue", "green", "white", "black")):
        paths.append(str(folder / f"{colour}.png"))
        Image.new("RGB", (40, 40), colour).save(paths[-1])
    return RetrievalIndex.from_images(pipe.gill_model, paths, dtype=torch.float32)


class _CountCalls:
    def __init__(self, module):
        self.calls, self.module, self.original = 0, module, module.forward
        module.forward = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)

    def restore(self):
        self.module.forward = self.original


def test_end_to_end_generation_is_seeded(pipe):
    out = pipe(PROMPT, generator=seeded(0), **FAST)
    kinds = [type(p).__name__ for p in out.parts]
    assert kinds == ["str", "ImagePart", "str"]
    part = out.parts[1]
    assert part.kind == "generated" and part.decision.mode == "gen" and part.decision.forced  # no index
    assert isinstance(part.image, Image.Image) and part.image.size == (32, 32)
    again = pipe(PROMPT, generator=seeded(0), **FAST)
    other = pipe(PROMPT, generator=seeded(1), **FAST)
    assert np.array_equal(np.asarray(out.images[0]), np.asarray(again.images[0]))
    assert not np.array_equal(np.asarray(out.images[0]), np.asarray(other.images[0]))
    assert out.parts[0] == again.parts[0] and out.generation.new_tokens.shape[1] == FAST["max_new_tokens"]


def test_retrieve_path_never_runs_the_unet(pipe, index):
    pipe.retrieval_index = index
    counter = _CountCalls(pipe.unet)
    try:
        out = pipe(PROMPT, decision="retrieve", num_candidates=3, **FAST)
        auto = pipe(PROMPT, decision="auto", decision_threshold=0.0, **FAST)  # P(ret) > 0: the head retrieves
    finally:
        counter.restore()
        pipe.retrieval_index = None
    assert counter.calls == 0
    part = out.parts[1]
    assert part.kind == "retrieved" and len(part.candidates) == 3
    img0 = out.generation.img0_hidden_states()
    with torch.no_grad():
        query = pipe.gill_model.text_retrieval_embeddings(img0)
    scores, indices = index.search(query, k=3)
    assert part.path == index.paths[indices[0, 0]] and part.score == pytest.approx(scores[0, 0].item())
    assert [c[0] for c in part.candidates] == [index.paths[j] for j in indices[0].tolist()]
    assert isinstance(part.image, Image.Image) and part.image.size == (40, 40)  # local file loaded
    assert auto.parts[1].kind == "retrieved" and not auto.parts[1].decision.forced


def test_an_answer_does_not_retrieve_the_same_image_twice(pipe, index):
    pipe.retrieval_index = index
    try:
        out = pipe(PROMPT, decision="retrieve", **{**FAST, "max_new_tokens": 24, "max_images": 2})
    finally:
        pipe.retrieval_index = None
    first, second = [p for p in out.parts if isinstance(p, ImagePart)]
    with torch.no_grad():
        query = pipe.gill_model.text_retrieval_embeddings(out.generation.img0_hidden_states())
    _, ranked = index.search(query, k=len(index))
    assert first.path == index.paths[ranked[0, 0]]
    expected = next(j for j in ranked[1].tolist() if index.paths[j] != first.path)
    assert second.path == index.paths[expected] != first.path


def test_auto_decision_uses_the_head_with_max_cosine(pipe, index):
    pipe.retrieval_index = index
    counter = _CountCalls(pipe.unet)
    try:
        out = pipe(PROMPT, decision="auto", decision_threshold=1.0, generator=seeded(0), **FAST)  # never retrieve
    finally:
        counter.restore()
        pipe.retrieval_index = None
    part = out.parts[1]
    assert part.kind == "generated" and counter.calls == FAST["num_inference_steps"]
    linear = pipe.gill_model.adapter.decision_head[1]
    expected = torch.softmax(linear(out.generation.img0_hidden_states()), -1)[0, 1].item()
    assert part.decision.p_retrieve == pytest.approx(expected, abs=1e-6)
    plain = pipe(PROMPT, generator=seeded(0), **FAST)
    assert np.array_equal(np.asarray(part.image), np.asarray(plain.images[0]))


def test_precomputed_embeddings_give_the_same_image(pipe):
    generation_only = {k: v for k, v in FAST.items() if k != "num_inference_steps"}
    prompt_embeds, negative = pipe.encode_prompt(PROMPT, **generation_only)
    assert prompt_embeds.shape == (1, 77, 32) and negative is None
    direct = pipe(prompt_embeds=prompt_embeds, generator=seeded(0), num_inference_steps=2)
    full = pipe(PROMPT, generator=seeded(0), **FAST)
    assert np.array_equal(np.asarray(direct.images[0]), np.asarray(full.images[0]))
    assert isinstance(direct.parts[0], ImagePart)
    # the same embeddings drive a stock Stable Diffusion pipeline to the same pixels
    stock = StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                                    unet=pipe.unet, scheduler=pipe.scheduler, safety_checker=None,
                                    feature_extractor=None, requires_safety_checker=False)
    stock.set_progress_bar_config(disable=True)
    stock_image = stock(prompt_embeds=prompt_embeds, num_inference_steps=2, generator=seeded(0)).images[0]
    assert np.array_equal(np.asarray(stock_image), np.asarray(full.images[0]))


def test_empty_prompt_embedding_is_computed_once_and_mapped_null_replaces_it(pipe, make_model):
    pipe._empty_prompt_embeds = None
    counter = _CountCalls(pipe.text_encoder)
    try:
        pipe(PROMPT, **FAST)
        pipe(PROMPT, **FAST)
        no_cfg = pipe(PROMPT, guidance_scale=1.0, generator=seeded(0), **FAST)
    finally:
        counter.restore()
    assert counter.calls == 1
    with torch.no_grad():
        ids = pipe.tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
        torch.testing.assert_close(pipe.empty_prompt_embeds(), pipe.text_encoder(ids)[0])
    assert isinstance(no_cfg.images[0], Image.Image)

    cfg_pipe = GILLPipeline(make_model("opt", cfg_dropout_prob=0.1).eval(), pipe.processor, pipe.unet, pipe.vae,
                            pipe.scheduler)  # no text encoder: the mapped-null embedding is the negative
    cfg_pipe.set_progress_bar_config(disable=True)
    seen = {}

    def spy(p, i, t, tensors):
        seen[i] = tensors["negative_prompt_embeds"]
        return {}

    cfg_pipe(PROMPT, callback_on_step_end=spy, callback_on_step_end_tensor_inputs=["negative_prompt_embeds"], **FAST)
    with torch.no_grad():
        torch.testing.assert_close(seen[0], cfg_pipe.gill_model.mapped_null_embedding())


def test_callbacks_and_output_types(pipe):
    steps = []

    def zero_latents_at_last_step(p, i, t, tensors):
        steps.append(i)
        return {"latents": tensors["latents"] * 0} if i == 1 else {}

    out = pipe(PROMPT, output_type="np", callback_on_step_end=zero_latents_at_last_step, **FAST)
    assert steps == [0, 1]
    zero = pipe.vae.decode(torch.zeros(1, 4, 16, 16), return_dict=False)[0]
    expected = pipe.image_processor.postprocess(zero.detach(), output_type="np")[0]
    np.testing.assert_allclose(out.images[0], expected, atol=1e-6)
    latent = pipe(PROMPT, output_type="latent", **FAST)
    assert latent.images[0].shape == (4, 16, 16)


def test_batch_of_prompts(pipe):
    out = pipe([PROMPT, ["a cat"]], generator=seeded(0), **FAST)
    assert len(out.parts) == 2 and all(isinstance(row, list) for row in out.parts)
    assert len(out.images) == 2 and all(img.size == (32, 32) for img in out.images)


def test_save_load_round_trip(pipe, index, tmp_path):
    pipe.retrieval_index = index
    try:
        pipe.save_pretrained(tmp_path)
    finally:
        pipe.retrieval_index = None
    model_index = json.loads((tmp_path / "model_index.json").read_text())
    assert model_index["gill_model"] == ["gill_hf.modeling_gill", "GILLForConditionalGeneration"]
    assert (tmp_path / "gill_model" / "model.safetensors").stat().st_size < 2_000_000  # adapter only
    loaded = GILLPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.retrieval_index is not None and loaded.retrieval_index.paths == index.paths
    for key, value in pipe.gill_model.adapter_state_dict().items():
        assert torch.equal(loaded.gill_model.adapter_state_dict()[key], value), key
    a = pipe(PROMPT, generator=seeded(0), **FAST)
    b = loaded(PROMPT, generator=seeded(0), decision="generate", **FAST)
    assert a.parts[0] == b.parts[0]
    assert np.array_equal(np.asarray(a.images[0]), np.asarray(b.images[0]))


def test_cli_writes_an_html_page(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    image_file = tmp_path / "dog.png"
    PROMPT[1].save(image_file)
    page = tmp_path / "answer.html"
    code = cli_main(["generate", str(tmp_path / "pipe"), "--text", "A photo of my dog.", "--image", str(image_file),
                     "--text", "Show me the beach & sun.", "-o", str(page), "--steps", "2", "--max-new-tokens", "12",
                     "--force-image-after", "1"])
    text = page.read_text()
    assert code == 0 and text.count("<img src=\"data:image/png;base64,") == 2  # the input and the generated image
    assert text.index("A photo of my dog.") < text.index("beach &amp; sun.")
    assert "generated (P(retrieve)" in text
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".gill-")] == []


def test_bad_inputs_raise(pipe, index):
    with pytest.raises(ValueError, match="prompt 0 has no text"):
        pipe([Image.new("RGB", (8, 8))], **FAST)
    with pytest.raises(ValueError, match="has no text"):
        pipe([""], **FAST)
    with pytest.raises(ValueError, match="needs a retrieval_index"):
        pipe(PROMPT, decision="retrieve", **FAST)
    with pytest.raises(ValueError, match=r"prompt_embeds must be \(N, L, 32\)"):
        pipe(prompt_embeds=torch.randn(1, 77, 16), num_inference_steps=2)
    with pytest.raises(ValueError, match="either prompt or prompt_embeds"):
        pipe(PROMPT, prompt_embeds=torch.randn(1, 77, 32))
    with pytest.raises(ValueError, match="no \\[IMG\\] block"):
        pipe.encode_prompt(PROMPT, max_new_tokens=3)
    with pytest.raises(ValueError, match="retrieval index is 16 wide but the GILL model's retrieval width"):
        pipe.retrieval_index = RetrievalIndex(torch.randn(3, 16), ["a", "b", "c"])  # not the model's p=256
    assert pipe.retrieval_index is None
    with pytest.raises(ValueError, match="at least one candidate"):
        RetrievalIndex(torch.zeros(0, 256), [])
    assert math.isfinite(index.logit_scale)


def test_pipeline_streams_its_text(pipe):
    from transformers import TextIteratorStreamer

    streamer = TextIteratorStreamer(pipe.processor.tokenizer, skip_prompt=True, timeout=60)
    result = {}
    thread = threading.Thread(target=lambda: result.update(out=pipe(PROMPT, streamer=streamer, **FAST)))
    thread.start()
    streamed = "".join(streamer)
    thread.join(timeout=120)
    out = result["out"]
    text = "".join(p for p in out.parts if isinstance(p, str))
    assert streamed.replace(" ", "") == text.replace(" ", "") and "[IMG" not in streamed
    assert len(out.images) == 1


def test_pipeline_rejects_several_sequences_per_prompt(pipe):
    with pytest.raises(ValueError, match="num_return_sequences=1"):
        pipe(PROMPT, num_return_sequences=2, **FAST)
