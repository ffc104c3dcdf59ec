"""Visual encoders (GILLConfig.visual_encoder): CLIP pooled, CLIP / SigLIP patch sequences and BLIP-2 vision +
Q-Former. Features, prefixes and retrieval vectors against the stock transformers models, the processor's
placeholder count, retrieval + decision through the pipeline, frozen / MLP projections, save / load / Hub / remote
code round trips, loading BLIP-2's image side from a whole BLIP-2 checkpoint, and bad input."""

import os
import subprocess
import sys
import textwrap

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import SMALL_MAPPER
from huggingface_hub.errors import StrictDataclassError
from no_gill import BLOCK_GILL
from PIL import Image
from transformers import Blip2ForConditionalGeneration, Blip2Model, CLIPVisionModel, SiglipVisionModel

from gill_hf import GILLConfig, GILLForConditionalGeneration, GILLPipeline, ImagePart, RetrievalIndex
from gill_hf.tiny import build_tiny_vision_encoder
from gill_hf.training.trainer import configure_trainable
from gill_hf.visual_encoders import Blip2QFormerVisionModel

pytestmark = pytest.mark.usefixtures("single_thread")

ENCODERS = ("clip_pooled", "clip_patches", "siglip_patches", "blip2_qformer")
FOLDER = {"clip_pooled": "clip", "clip_patches": "clip", "siglip_patches": "siglip", "blip2_qformer": "blip2"}
TOKENS = {"clip_pooled": 4, "clip_patches": 17, "siglip_patches": 16, "blip2_qformer": 6}  # 32 px, 8 px patches
WIDTH = {"clip_pooled": 32, "clip_patches": 32, "siglip_patches": 32, "blip2_qformer": 48}  # d
COLOURS = ("red", "blue", "green", "white")


@pytest.fixture(scope="module")
def folders(tiny_backbones, tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("vision")
    return {"clip": tiny_backbones["clip"], "siglip": build_tiny_vision_encoder(out, "siglip"),
            "blip2": build_tiny_vision_encoder(out, "blip2")}


@pytest.fixture(scope="module")
def make_encoder_model(tiny_backbones, folders):
    def _make(encoder: str, seed: int = 0, **overrides) -> GILLForConditionalGeneration:
        torch.manual_seed(seed)
        model = GILLForConditionalGeneration.from_backbones(tiny_backbones["opt"], folders[FOLDER[encoder]],
                                                            tiny_backbones["sd"], visual_encoder=encoder,
                                                            **SMALL_MAPPER, **overrides)
        with torch.no_grad():  # an adapter unlike any fresh one, so round trips show
            for param in model.adapter.parameters():
                param.add_(torch.randn_like(param) * 0.1)
        return model.eval()

    return _make


@pytest.fixture(scope="module")
def models(make_encoder_model) -> dict[str, GILLForConditionalGeneration]:
    return {encoder: make_encoder_model(encoder) for encoder in ENCODERS}


def _images():
    return [Image.new("RGB", (40, 36), colour) for colour in COLOURS]


def _reference(encoder: str, folder: str, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features W_cap reads, image vector W_i2t reads) from the stock transformers model of ``folder``."""
    with torch.no_grad():
        if encoder == "blip2_qformer":
            states = Blip2Model.from_pretrained(folder).eval().get_qformer_features(pixel_values=pixels)
            return states, states.mean(1)
        out = (SiglipVisionModel if encoder == "siglip_patches" else CLIPVisionModel).from_pretrained(folder)(
            pixel_values=pixels)
        features = out.pooler_output if encoder == "clip_pooled" else out.last_hidden_state
        return features, out.pooler_output


@pytest.mark.parametrize("encoder", ENCODERS)
def test_features_prefix_and_retrieval_vector_match_the_stock_encoders(models, folders, encoder):
    model = models[encoder]
    k, e = TOKENS[encoder], model.config.llm_embed_dim
    assert model.config.num_visual_tokens == k and model.config.vision_dim == WIDTH[encoder]
    pixels = model.processor.preprocess_images(_images())
    features, vector = _reference(encoder, folders[FOLDER[encoder]], pixels)
    with torch.no_grad():
        prefix = model.get_image_features(pixels).pooler_output
        ret = model.image_retrieval_embeddings(model.encode_images(pixels))
    w, b = model.adapter.w_cap.weight, model.adapter.w_cap.bias
    expected = (features @ w.T + b).view(len(COLOURS), k, e)  # pooled: one (k * e) row split into k
    torch.testing.assert_close(prefix, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ret, vector @ model.adapter.w_i2t.weight.T + model.adapter.w_i2t.bias,
                               rtol=1e-5, atol=1e-6)
    assert not torch.allclose(prefix[0], prefix[1])  # the images differ, and so do their tokens


@pytest.mark.parametrize("encoder", ENCODERS)
def test_processor_expands_each_image_to_the_encoder_token_count(models, encoder):
    model = models[encoder]
    enc = model.processor(["a photo", Image.new("RGB", (40, 36), "red"), "and", Image.new("RGB", (40, 36), "blue")])
    assert int((enc["input_ids"] == model.config.image_token_id).sum()) == 2 * TOKENS[encoder]
    with torch.no_grad():
        out = model(**enc)  # the prefixes fill exactly the placeholders
    assert torch.equal(out.image_hidden_states, model.get_image_features(enc["pixel_values"]).pooler_output)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_objective_retrieval_and_decision_run_for_each_encoder(models, folders, encoder, caption_batch, tmp_path):
    model = models[encoder]
    with torch.no_grad():
        out = model(**caption_batch(model, n=2), gill_objective=True, pack=False)
    assert all(torch.isfinite(getattr(out, name)) for name in ("caption_loss", "ret_loss", "gen_loss", "loss"))
    paths = []
    for colour in COLOURS:
        paths.append(str(tmp_path / f"{colour}.png"))
        Image.new("RGB", (40, 40), colour).save(paths[-1])
    index = RetrievalIndex.from_images(model, paths, dtype=torch.float32)
    _, vectors = _reference(encoder, folders[FOLDER[encoder]],
                            model.processor.preprocess_images([Image.open(p) for p in paths]))
    with torch.no_grad():
        candidates = F.normalize(model.adapter.w_i2t(vectors), dim=-1)  # the index rows, from the stock encoder
    torch.testing.assert_close(index.embeddings, candidates, rtol=1e-5, atol=1e-6)
    pipe = GILLPipeline.from_gill(model, retrieval_index=index)
    pipe.set_progress_bar_config(disable=True)
    prompt = ["A photo of my dog.", Image.new("RGB", (40, 36), "red"), "Show me the dog."]
    answer = pipe(prompt, decision="auto", decision_threshold=0.0, num_candidates=2, max_new_tokens=12,
                  force_image_after=2, max_images=1, eos_token_id=[])
    (part,) = [p for p in answer.parts if isinstance(p, ImagePart)]
    assert part.kind == "retrieved" and not part.decision.forced
    img0 = answer.generation.img0_hidden_states()
    expected = torch.softmax(model.adapter.decision_head[1](img0), -1)[0, 1].item()
    assert part.decision.p_retrieve == pytest.approx(expected, abs=1e-6)
    with torch.no_grad():
        query = F.normalize(model.text_retrieval_embeddings(img0), dim=-1)
    scores, best = (model.adapter.logit_scale.exp() * query @ candidates.T).topk(2)  # brute force
    assert [path for path, _ in part.candidates] == [paths[i] for i in best[0]]
    assert [score for _, score in part.candidates] == pytest.approx(scores[0].tolist(), abs=1e-5)


def test_mlp_and_frozen_projection_are_saved_and_stay_frozen(make_encoder_model, caption_batch, tmp_path):
    model = make_encoder_model("blip2_qformer", visual_projection="mlp", train_visual_projection=False)
    e = model.config.llm_embed_dim
    shapes = {k: tuple(v.shape) for k, v in model.adapter_state_dict().items() if k.startswith("adapter.w_cap.")}
    assert shapes == {"adapter.w_cap.0.weight": (e, 48), "adapter.w_cap.0.bias": (e,),
                      "adapter.w_cap.2.weight": (e, e), "adapter.w_cap.2.bias": (e,)}
    assert not any(name.startswith("adapter.w_cap.") for name in configure_trainable(model.train()))
    out = model(**caption_batch(model, n=2), gill_objective=True, pack=False)
    out.loss.backward()
    assert all(p.grad is None for p in model.adapter.w_cap.parameters())
    assert model.adapter.w_i2t.weight.grad is not None  # W_i2t still trains on the Q-Former vector
    model.zero_grad()
    model.save_pretrained(tmp_path)
    stored = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert {k for k in stored if k.startswith("adapter.w_cap.")} == set(shapes)  # frozen, saved all the same
    assert not any(k.startswith(("vision_model", "language_model", "qformer", "query_tokens")) for k in stored)
    loaded = GILLForConditionalGeneration.from_pretrained(tmp_path)
    assert type(loaded.vision_model) is Blip2QFormerVisionModel
    assert not any(p.requires_grad for p in loaded.adapter.w_cap.parameters())
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key
    pixels = model.processor.preprocess_images(_images()[:2])
    with torch.no_grad():
        assert torch.equal(loaded.get_image_features(pixels).pooler_output,
                           model.eval().get_image_features(pixels).pooler_output)


def test_blip2_image_side_loads_from_a_whole_checkpoint_without_its_language_model(folders):
    whole = Blip2ForConditionalGeneration.from_pretrained(folders["blip2"])
    part, info = Blip2QFormerVisionModel.from_pretrained(folders["blip2"], output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    own = part.state_dict()
    assert set(own) == {k for k in whole.state_dict() if k.startswith(("vision_model.", "qformer.", "query_tokens"))}
    for key, value in own.items():
        assert torch.equal(value, whole.state_dict()[key]), key
    assert not hasattr(part, "language_model") and not hasattr(part, "language_projection")


@pytest.mark.parametrize("encoder", ["siglip_patches", "blip2_qformer"])
def test_hub_round_trip(fake_hub, models, encoder):
    model = models[encoder]
    repo = f"alice/gill-{encoder.replace('_', '-')}"
    model.push_to_hub(repo, remote_code=False)
    assert f"| visual encoder | {encoder}, linear projection |" in fake_hub.repos[repo].files()["README.md"].decode()
    loaded = GILLForConditionalGeneration.from_pretrained(repo)
    assert loaded.config.visual_encoder == encoder and type(loaded.vision_model) is type(model.vision_model)
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key
    pixels = model.processor.preprocess_images(_images())
    with torch.no_grad():
        features = model.encode_images(pixels)
        assert torch.equal(loaded.encode_images(pixels), features)
        assert torch.equal(loaded.get_image_features(pixels).pooler_output,
                           model.get_image_features(pixels).pooler_output)
        assert torch.equal(loaded.image_retrieval_embeddings(features), model.image_retrieval_embeddings(features))


CHILD = BLOCK_GILL + textwrap.dedent("""
    import safetensors.torch, torch
    from transformers import AutoModel

    repo, pixels_file, out = sys.argv[1:4]
    model = AutoModel.from_pretrained(repo, trust_remote_code=True)
    pixels = safetensors.torch.load_file(pixels_file)["pixels"]
    with torch.no_grad():
        features = model.encode_images(pixels)
        result = {"prefix": model.get_image_features(pixels).pooler_output,
                  "retrieval": model.image_retrieval_embeddings(features)}
    safetensors.torch.save_file(result, out)
    print(type(model.vision_model).__module__)
""")


def test_remote_code_loads_the_qformer_encoder_without_gill_hf(fake_hub, models, tmp_path):
    model = models["blip2_qformer"]
    model.push_to_hub("alice/gill-qformer-remote")
    assert "visual_encoders.py" in fake_hub.repos["alice/gill-qformer-remote"].files()
    pixels = model.processor.preprocess_images(_images())
    safetensors.torch.save_file({"pixels": pixels}, str(tmp_path / "pixels.safetensors"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHONPATH"))}
    env.update(HF_ENDPOINT=fake_hub.endpoint, HF_TOKEN=fake_hub.token, HF_HUB_OFFLINE="0",
               HF_HOME=str(tmp_path / "home"), HF_MODULES_CACHE=str(tmp_path / "modules"),
               HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    args = ["alice/gill-qformer-remote", str(tmp_path / "pixels.safetensors"), str(tmp_path / "out.safetensors")]
    result = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("transformers_modules.alice.")  # the pushed file ran
    theirs = safetensors.torch.load_file(str(tmp_path / "out.safetensors"))
    with torch.no_grad():
        assert torch.equal(theirs["prefix"], model.get_image_features(pixels).pooler_output)
        assert torch.equal(theirs["retrieval"], model.image_retrieval_embeddings(model.encode_images(pixels)))


def test_bad_encoder_choices_fail_before_backbones_load(tiny_backbones, folders, models, monkeypatch):
    import gill_hf.loading

    def no_loading(*args, **kwargs):
        raise AssertionError("backbones loaded")

    monkeypatch.setattr(gill_hf.loading, "load_backbones", no_loading)
    with pytest.raises(ValueError, match=r"visual_encoder='siglip_patches' reads a siglip or siglip_vision_model "
                                         r"checkpoint, but .*clip holds model_type 'clip_vision_model'"):
        GILLForConditionalGeneration.from_backbones(tiny_backbones["opt"], folders["clip"],
                                                    visual_encoder="siglip_patches")
    with pytest.raises(StrictDataclassError, match=r"num_visual_tokens=4, but visual_encoder='clip_patches' gives 17"):
        GILLForConditionalGeneration.from_backbones(tiny_backbones["opt"], folders["clip"],
                                                    visual_encoder="clip_patches", num_visual_tokens=4)
    with pytest.raises(TypeError, match="qformer_config"):
        GILLForConditionalGeneration.from_backbones(tiny_backbones["opt"], folders["blip2"],
                                                    visual_encoder="blip2_qformer", qformer_config={})
    blip2 = models["blip2_qformer"]
    with pytest.raises(ValueError, match="visual_encoder='blip2_qformer' needs a Blip2QFormerVisionModel, got "
                                         "CLIPVisionModel"):
        GILLForConditionalGeneration(blip2.config, blip2.language_model, models["clip_patches"].vision_model)
    with pytest.raises(ValueError, match=r"image features have shape \(2, 17, 32\), expected \(2, 6, 48\)"):
        blip2.visual_prefix(torch.zeros(2, 17, 32))


def test_config_checks_the_encoder_sub_configs(models):
    blip2 = models["blip2_qformer"].config
    vision, qformer = blip2.vision_config.to_dict(), blip2.qformer_config.to_dict()
    bad = [({"visual_encoder": "siglip_patches"},
            "visual_encoder='siglip_patches' needs a 'siglip_vision_model' vision_config, got 'clip_vision_model'"),
           ({"visual_encoder": "blip2_qformer", "vision_config": vision, "num_visual_tokens": 32},
            "visual_encoder='blip2_qformer' needs a 'blip_2_qformer' qformer_config, got None"),
           ({"qformer_config": qformer}, "qformer_config is for visual_encoder='blip2_qformer' only"),
           ({"visual_encoder": "blip2_qformer", "vision_config": vision, "num_visual_tokens": 32,
             "qformer_config": {**qformer, "encoder_hidden_size": 16}},
            r"qformer_config.encoder_hidden_size \(16\) must equal vision_config.hidden_size \(32\)"),
           ({"visual_projection": "conv"}, r"visual_projection.*expected one of \(.linear., .mlp.\)")]
    for fields, message in bad:
        with pytest.raises(StrictDataclassError, match=message):
            GILLConfig(**fields)
    again = GILLConfig.from_dict(blip2.to_dict())  # the sub-configs survive config.json
    assert type(again.qformer_config) is type(blip2.qformer_config) and again.vision_dim == 48
    assert again.num_visual_tokens == again.num_query_tokens == 6
