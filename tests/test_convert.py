"""gill-hf convert-original: the released key layout, exact tensor mapping, refusals, and original-style inference.

The release checkpoint is regenerated here from the documented key list (paper widths, random bf16 values); the
decision model and model_args.json are the real release files.
"""

import json
import logging
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from transformers import AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel, OPTConfig, OPTForCausalLM

from gill_hf import GILLAdapter, GILLConfig, GILLForConditionalGeneration, GILLProcessor, RetrievalIndex
from gill_hf.cli import main as cli_main
from gill_hf.convert_original import config_from_model_args, convert_original_release, release_key_shapes
from gill_hf.decision import decide
from gill_hf.tiny import build_tiny_release

RELEASE = Path("/work/shared/data/gill-release")
MODEL_ARGS = RELEASE / "model_args.json"
DECISION = RELEASE / "decision_model.pth.tar"
IMG_IDS = list(range(50266, 50274))
N_CANDIDATES = 6


def released_shapes() -> dict[str, tuple[int, ...]]:
    """The 137 tensors of pretrained_ckpt.pth.tar (gill-as-coded.md §2.2), written out independently."""
    shapes = {"model.input_embeddings.weight": (8, 4096), "model.logit_scale": (),
              "model.visual_embeddings.weight": (16384, 1024), "model.visual_embeddings.bias": (16384,),
              "model.visual_fc.weight": (256, 1024), "model.visual_fc.bias": (256,),
              "model.ret_text_hidden_fcs.0.model.weight": (256, 4096), "model.ret_text_hidden_fcs.0.model.bias": (256,),
              "model.gen_text_hidden_fcs.0.fc.weight": (512, 4096), "model.gen_text_hidden_fcs.0.fc.bias": (512,),
              "model.gen_text_hidden_fcs.0.query_embs": (1, 77, 512),
              "model.gen_text_hidden_fcs.0.model.weight": (768, 512), "model.gen_text_hidden_fcs.0.model.bias": (768,)}
    attention = {"in_proj_weight": (1536, 512), "in_proj_bias": (1536,), "out_proj.weight": (512, 512),
                 "out_proj.bias": (512,)}
    feed_forward = {"linear1.weight": (2048, 512), "linear1.bias": (2048,), "linear2.weight": (512, 2048),
                    "linear2.bias": (512,)}
    tfm = "model.gen_text_hidden_fcs.0.tfm."
    for i in range(4):
        for part, blocks, norms in (("encoder", ["self_attn"], 2), ("decoder", ["self_attn", "multihead_attn"], 3)):
            layer = f"{tfm}{part}.layers.{i}."
            shapes.update({f"{layer}{b}.{k}": v for b in blocks for k, v in attention.items()})
            shapes.update({f"{layer}{k}": v for k, v in feed_forward.items()})
            shapes.update({f"{layer}norm{n}.{w}": (512,) for n in range(1, norms + 1) for w in ("weight", "bias")})
    shapes.update({f"{tfm}{part}.norm.{w}": (512,) for part in ("encoder", "decoder") for w in ("weight", "bias")})
    return shapes


def random_release(seed: int = 0) -> dict[str, torch.Tensor]:
    """A release-shaped state dict in bf16 (weights ~N(0, 0.02), LayerNorms ~1, the std-1 queries, log(1/0.07))."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in released_shapes().items():
        if key.endswith("logit_scale"):
            value = torch.tensor(2.6592600369644043)
        elif ".norm" in key and key.endswith("weight"):
            value = 1 + 0.1 * torch.randn(shape, generator=g)
        elif key.endswith("query_embs"):
            value = torch.randn(shape, generator=g)
        else:
            value = 0.02 * torch.randn(shape, generator=g)
        state[key] = value.to(torch.bfloat16)
    return state


def cheap_release() -> dict[str, torch.Tensor]:
    """Release-shaped zeros that take almost no disk: every tensor is one element broadcast to its shape."""
    return {k: torch.zeros((), dtype=torch.bfloat16).expand(shape) for k, shape in released_shapes().items()}


def save_release(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save({"state_dict": state}, path)
    return path


class ImportsOs:
    """Pickles as a call to os.system: what a hostile embeddings file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """A converted release: (original tensors, embeddings, output dir), via the CLI."""
    root = tmp_path_factory.mktemp("release")
    state = random_release()
    checkpoint = save_release(state, root / "pretrained_ckpt.pth.tar")
    rng = np.random.default_rng(0)
    embeddings = [rng.standard_normal(256).astype(np.float32) for _ in range(N_CANDIDATES)]
    with open(root / "cc3m_embeddings_urls.npy", "wb") as handle:
        pickle.dump({"paths": [f"https://example.com/{i}.jpg" for i in range(N_CANDIDATES)],
                     "embeddings": embeddings}, handle)
    out = root / "converted"
    assert cli_main(["convert-original", "--checkpoint", str(checkpoint), "--model-args", str(MODEL_ARGS),
                     "--decision", str(DECISION), "--embeddings", str(root / "cc3m_embeddings_urls.npy"),
                     "--out", str(out)]) == 0
    return state, np.stack(embeddings), out


def test_release_layout_is_derived_exactly():
    shapes = release_key_shapes(config_from_model_args(json.loads(MODEL_ARGS.read_text())))
    assert len(shapes) == 137
    assert shapes == released_shapes()


def test_model_args_map_to_config(release):
    config = GILLConfig.from_pretrained(release[2])
    assert config.text_model_name_or_path == "facebook/opt-6.7b"
    assert config.vision_model_name_or_path == "openai/clip-vit-large-patch14"
    assert (config.num_visual_tokens, config.num_img_tokens, config.ret_emb_dim) == (4, 8, 256)
    assert (config.num_gen_queries, config.gen_emb_dim, config.hidden_layer) == (77, 768, -1)
    assert config.img_token_ids == IMG_IDS and config.image_token_id == 50265
    assert config.mapper_type == "gill_mapper" and config.mapper_add_input_embeddings
    assert (config.mapper_hidden_dim, config.mapper_encoder_layers, config.mapper_decoder_layers) == (512, 4, 4)
    assert config.tie_img_embeddings and config.llm_feature_dim == 4096 and config.vision_dim == 1024
    assert config.decision_threshold == 0.5 and not config.decision_use_retrieval_score


def test_every_tensor_is_mapped_with_its_dtype(release):
    state, _, out = release
    converted = safetensors.torch.load_file(out / "model.safetensors")
    with torch.device("meta"):
        model_keys = {"adapter." + k for k in GILLAdapter(GILLConfig.from_pretrained(out)).state_dict()}
    assert set(converted) == model_keys
    # The lead's mapping table, spelled out by hand.
    pairs = {
        "model.input_embeddings.weight": "adapter.img_embeddings",
        "model.logit_scale": "adapter.logit_scale",
        "model.visual_embeddings.weight": "adapter.w_cap.weight",
        "model.visual_fc.bias": "adapter.w_i2t.bias",
        "model.ret_text_hidden_fcs.0.model.weight": "adapter.w_t2i.weight",
        "model.gen_text_hidden_fcs.0.fc.weight": "adapter.mapper.in_proj.weight",
        "model.gen_text_hidden_fcs.0.query_embs": "adapter.mapper.queries",
        "model.gen_text_hidden_fcs.0.model.bias": "adapter.mapper.out_proj.bias",
        "model.gen_text_hidden_fcs.0.tfm.decoder.layers.3.multihead_attn.in_proj_weight":
            "adapter.mapper.transformer.decoder.layers.3.multihead_attn.in_proj_weight",
        "model.gen_text_hidden_fcs.0.tfm.encoder.norm.bias": "adapter.mapper.transformer.encoder.norm.bias",
    }
    for theirs, ours in pairs.items():
        assert torch.equal(converted[ours], state[theirs]), ours
    # Every released tensor appears once, unchanged and still bf16 (random values: matching sums identify them).
    by_sum = {(tuple(v.shape), v.float().sum().item()): k for k, v in converted.items()}
    matched = {by_sum.get((tuple(v.shape), v.float().sum().item())) for v in state.values()}
    assert None not in matched and len(matched) == len(state) == 137
    for theirs, value in state.items():
        ours = by_sum[(tuple(value.shape), value.float().sum().item())]
        assert torch.equal(converted[ours], value) and converted[ours].dtype == torch.bfloat16, theirs
    decision = torch.load(DECISION, map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(converted["adapter.decision_head.1.weight"], decision["1.weight"])
    assert torch.equal(converted["adapter.decision_head.1.bias"], decision["1.bias"])
    assert converted["adapter.decision_head.1.weight"].dtype == torch.float32


def test_embeddings_become_a_retrieval_index(release):
    state, embeddings, out = release
    index = RetrievalIndex.load(out / "retrieval_index")
    assert index.paths == [f"https://example.com/{i}.jpg" for i in range(N_CANDIDATES)]
    assert index.logit_scale == pytest.approx(state["model.logit_scale"].float().item())
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(index.embeddings.float().numpy(), unit, atol=2e-3)  # fp16 storage


def tiny_paper_width_backbones():
    """An OPT whose input/output width is 4096 (the release's) but whose core is 16 wide, and a 1024-wide CLIP."""
    torch.manual_seed(0)
    llm = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32,
                                   num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=4096,
                                   do_layer_norm_before=True, pad_token_id=1, bos_token_id=2, eos_token_id=2))
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=1024, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=16, image_size=32, patch_size=16))
    return llm.eval(), clip.eval()


def original_mapper(state: dict[str, torch.Tensor]) -> nn.Module:
    """The original gill_mapper head rebuilt from the release tensors: Linear -> nn.Transformer(queries) -> Linear."""
    prefix = "model.gen_text_hidden_fcs.0."
    with warnings.catch_warnings():  # norm_first disables the nested-tensor fast path; harmless
        warnings.filterwarnings("ignore", message="enable_nested_tensor")
        tfm = nn.Transformer(d_model=512, nhead=4, num_encoder_layers=4, num_decoder_layers=4,
                             dim_feedforward=2048, dropout=0.0, batch_first=True, norm_first=True)
    tfm.load_state_dict({k[len(prefix) + 4:]: v.float() for k, v in state.items() if k.startswith(prefix + "tfm.")})
    return tfm.eval()


@torch.no_grad()
def test_converted_model_answers_as_the_original(release):
    state, embeddings, out = release
    w = {k: v.float() for k, v in state.items()}
    llm, clip = tiny_paper_width_backbones()
    model = GILLForConditionalGeneration.from_pretrained(out, language_model=llm, vision_model=clip)

    # Original semantics, written from the release tensors directly.
    text_ids = torch.tensor([2, 17, 33, 9, 41])
    img_rows = w["model.input_embeddings.weight"]  # (8, 4096)
    embeds = torch.cat([llm.get_input_embeddings()(text_ids), img_rows])[None]  # (1, 13, 4096)
    original = llm(inputs_embeds=embeds, output_hidden_states=True, use_cache=False)
    hidden = original.hidden_states[-1][0, len(text_ids):]  # (8, 4096) last-layer states at [IMG0..7]
    img_logits = hidden @ img_rows.t()  # tied LM head rows of the [IMG] tokens
    ret_query = F.linear(hidden[0], w["model.ret_text_hidden_fcs.0.model.weight"],
                         w["model.ret_text_hidden_fcs.0.model.bias"])  # (256,) from [IMG0] only
    mapper_in = F.linear(hidden + img_rows, w["model.gen_text_hidden_fcs.0.fc.weight"],
                         w["model.gen_text_hidden_fcs.0.fc.bias"])  # residual add of the [IMG] input embeddings
    tfm_out = original_mapper(state)(src=mapper_in[None], tgt=w["model.gen_text_hidden_fcs.0.query_embs"])
    gen_embeds = F.linear(tfm_out, w["model.gen_text_hidden_fcs.0.model.weight"],
                          w["model.gen_text_hidden_fcs.0.model.bias"])  # (1, 77, 768)
    candidates = torch.from_numpy(embeddings)
    scores = w["model.logit_scale"].exp() * F.normalize(candidates, dim=-1) @ F.normalize(ret_query, dim=0)
    decision = torch.load(DECISION, map_location="cpu", weights_only=True)["state_dict"]
    decision_probs = F.linear(hidden[0], decision["1.weight"], decision["1.bias"]).softmax(-1)

    # gill_hf, through its own building blocks.
    ids = torch.cat([text_ids, torch.tensor(IMG_IDS)])[None]
    logits, features, _ = model.run_language_model(model.embed_tokens(ids), torch.ones_like(ids), use_cache=False)
    rows, cols = model.img_block_positions(ids)
    states = features[rows, cols]  # (1, 8, 4096)
    torch.testing.assert_close(states[0], hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits[0, len(text_ids):][:, IMG_IDS], img_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model.text_retrieval_embeddings(states[:, 0])[0], ret_query, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.gen_embeddings(states), gen_embeds, rtol=1e-4, atol=1e-4)
    index = RetrievalIndex(candidates, [str(i) for i in range(N_CANDIDATES)], model.adapter.logit_scale.item(),
                           dtype=torch.float32)
    ours_scores, ours_order = index.search(model.text_retrieval_embeddings(states[:, 0])[0], k=N_CANDIDATES)
    torch.testing.assert_close(ours_scores, scores.sort(descending=True).values, rtol=1e-4, atol=1e-4)
    assert ours_order.tolist() == scores.argsort(descending=True).tolist()
    (choice,) = decide(model, states[:, 0])
    assert choice.mode == ("ret" if decision_probs.argmax() == 1 else "gen")
    assert choice.p_retrieve == pytest.approx(decision_probs[1].item(), abs=1e-5)

    # Visual side: pooled CLIP -> W_cap (k=4 prefix vectors) and -> W_i2t (retrieval).
    pixels = torch.randn(1, 3, 32, 32)
    pooled = clip(pixel_values=pixels).pooler_output
    prefix = F.linear(pooled, w["model.visual_embeddings.weight"], w["model.visual_embeddings.bias"]).view(1, 4, 4096)
    features = model.encode_images(pixels)
    torch.testing.assert_close(model.visual_prefix(features), prefix, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(model.image_retrieval_embeddings(features),
                               F.linear(pooled, w["model.visual_fc.weight"], w["model.visual_fc.bias"]),
                               rtol=1e-4, atol=1e-5)


def test_without_decision_model_it_always_generates(tmp_path):
    checkpoint = save_release(cheap_release(), tmp_path / "ckpt.pth.tar")
    summary = convert_original_release(checkpoint, MODEL_ARGS, tmp_path / "out")
    assert summary["tensors"] == 139 and summary["decision_head"] == "always generate"
    weights = safetensors.torch.load_file(tmp_path / "out" / "model.safetensors")
    head = nn.Linear(4096, 2)
    head.load_state_dict({"weight": weights["adapter.decision_head.1.weight"],
                          "bias": weights["adapter.decision_head.1.bias"]})
    assert (head(torch.randn(100, 4096) * 50).argmax(-1) == 0).all()  # 0 = generate, whatever the state


def _edit(name):
    def missing(state):
        del state["model.visual_fc.bias"]

    def extra(state):
        state["model.visual_fc.scale"] = torch.ones(256)

    def wrong_shape(state):
        state["model.gen_text_hidden_fcs.0.query_embs"] = torch.zeros(1, 76, 512)

    return {"missing": missing, "extra": extra, "wrong_shape": wrong_shape}[name]


@pytest.mark.parametrize(("edit", "message"), [
    ("missing", r"missing keys \(1\): \['model.visual_fc.bias'\]"),
    ("extra", r"unexpected keys \(1\): \['model.visual_fc.scale'\]"),
    ("wrong_shape", r"model.gen_text_hidden_fcs.0.query_embs: \(1, 76, 512\), expected \(1, 77, 512\)"),
])
def test_refuses_a_checkpoint_that_is_not_the_release(tmp_path, edit, message):
    state = cheap_release()
    _edit(edit)(state)
    checkpoint = save_release(state, tmp_path / "ckpt.pth.tar")
    with pytest.raises(ValueError, match=message):
        convert_original_release(checkpoint, MODEL_ARGS, tmp_path / "out", decision=DECISION)
    assert not (tmp_path / "out").exists() and os.listdir(tmp_path) == ["ckpt.pth.tar"]


def test_lists_every_problem_at_once(tmp_path):
    state = cheap_release()
    state["model.visual_fc.weightt"] = state.pop("model.visual_fc.weight")
    state["model.logit_scale"] = torch.zeros(1)
    with pytest.raises(ValueError) as info:
        convert_original_release(save_release(state, tmp_path / "c.pth.tar"), MODEL_ARGS, tmp_path / "out")
    text = str(info.value)
    assert "missing keys (1): ['model.visual_fc.weight']" in text
    assert "unexpected keys (1): ['model.visual_fc.weightt']" in text
    assert "model.logit_scale: (1,), expected ()" in text


def test_refuses_a_pickle_that_imports_beyond_numpy(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "cc3m_embeddings.npy", "wb") as handle:
        pickle.dump({"paths": ["a.jpg"], "embeddings": [ImportsOs(marker)]}, handle)
    checkpoint = save_release(cheap_release(), tmp_path / "ckpt.pth.tar")
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle (posix|os)\.system"):
        convert_original_release(checkpoint, MODEL_ARGS, tmp_path / "out", embeddings=tmp_path / "cc3m_embeddings.npy")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_refuses_a_checkpoint_with_code(tmp_path):
    torch.save({"state_dict": cheap_release(), "hook": ImportsOs(tmp_path / "pwned")}, tmp_path / "ckpt.pth.tar")
    with pytest.raises(ValueError, match="not a plain tensor checkpoint"):
        convert_original_release(tmp_path / "ckpt.pth.tar", MODEL_ARGS, tmp_path / "out")
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(("change", "message"), [
    ({"text_fc_mode": "linear"}, "text_fc_mode='linear' is not supported"),
    ({"share_ret_gen": False}, "share_ret_gen=False is not supported"),
    ({"text_emb_layers": [-1, -2]}, "only one LLM layer"),
    ({"learning_rate": 0.001}, r"unknown fields \['learning_rate'\]"),
    ({"gen_token_idx": list(range(50266, 50273))}, "retrieval_token_idx and gen_token_idx differ"),
])
def test_refuses_model_args_it_cannot_reproduce(change, message):
    args = {**json.loads(MODEL_ARGS.read_text()), **change}
    with pytest.raises(ValueError, match=message):
        config_from_model_args(args)


def test_refuses_a_non_empty_output_folder(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_original_release(tmp_path / "missing.pth.tar", MODEL_ARGS, tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_other_backbones_and_processor(tmp_path, tiny_backbones):
    """model_args naming local backbones: widths come from their configs and --with-processor saves a processor."""
    probe = GILLProcessor(CLIPImageProcessor.from_pretrained(tiny_backbones["clip"]),
                          AutoTokenizer.from_pretrained(tiny_backbones["opt"]))
    files = build_tiny_release(tmp_path / "release", tiny_backbones)  # release-format files at tiny widths
    args = json.loads(Path(files["model_args"]).read_text())
    assert set(args) == set(json.loads(MODEL_ARGS.read_text()))  # the released fields, no more, no fewer
    assert args["gen_token_idx"] == args["retrieval_token_idx"] == probe.img_token_ids
    shapes = release_key_shapes(config_from_model_args(args))
    assert shapes["model.input_embeddings.weight"] == (8, 64) and shapes["model.visual_fc.weight"] == (256, 32)
    checkpoint = files["checkpoint"]
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert {k: tuple(v.shape) for k, v in state.items()} == shapes
    assert cli_main(["convert-original", "--checkpoint", checkpoint, "--model-args", files["model_args"],
                     "--with-processor", "--out", str(tmp_path / "out")]) == 0

    model = GILLForConditionalGeneration.from_pretrained(tmp_path / "out")  # backbones by the ids in model_args
    assert model.processor.img_token_ids == probe.img_token_ids
    assert model.processor.image_token_id == probe.image_token_id == model.config.image_token_id
    assert torch.equal(model.adapter.w_i2t.weight, state["model.visual_fc.weight"].float())
    batch = model.processor.encode_captions(["a red circle"], max_length=16)
    out = model(**batch, gill_objective=True, pixel_values=model.processor.preprocess_images([Image.new("RGB", (32, 32), "red")]))
    assert torch.isfinite(out.loss)



@pytest.mark.parametrize("with_processor", [True, False])
def test_ids_come_from_the_tokenizer_as_load_gill(tmp_path, tiny_backbones, caplog, with_processor):
    """model_args.json ids that are not the tokenizer's: the tokenizer's are written (with a warning naming both),
    and the converted model runs; before, it refused (--with-processor) or ended in a bare IndexError."""
    probe = GILLProcessor(CLIPImageProcessor.from_pretrained(tiny_backbones["clip"]),
                          AutoTokenizer.from_pretrained(tiny_backbones["opt"]))
    files = build_tiny_release(tmp_path / "release", tiny_backbones)
    args = json.loads(Path(files["model_args"]).read_text())
    args["gen_token_idx"] = args["retrieval_token_idx"] = IMG_IDS  # the OPT-6.7B ids, not this tokenizer's
    (tmp_path / "shifted.json").write_text(json.dumps(args))
    with caplog.at_level(logging.WARNING, logger="gill_hf.convert_original"):
        summary = convert_original_release(files["checkpoint"], tmp_path / "shifted.json", tmp_path / "out",
                                           with_processor=with_processor)
    warning = caplog.text
    assert f"gives [IMG] ids {IMG_IDS} (<|image|> 50265) but the tokenizer gives {probe.img_token_ids} " \
           f"(<|image|> {probe.image_token_id})" in warning
    config = GILLConfig.from_pretrained(tmp_path / "out")
    assert (config.img_token_ids, config.image_token_id) == (probe.img_token_ids, probe.image_token_id)
    assert (summary["img_token_ids"], summary["image_token_id"]) == (probe.img_token_ids, probe.image_token_id)
    model = GILLForConditionalGeneration.from_pretrained(tmp_path / "out")
    if not with_processor:
        model.processor = probe
    batch = probe.encode_captions(["a red circle"], max_length=16)
    out = model(**batch, gill_objective=True, pixel_values=probe.preprocess_images([Image.new("RGB", (32, 32))]))
    assert torch.isfinite(out.loss)


def test_every_load_checks_the_ids(tmp_path, tiny_backbones, monkeypatch):
    """A config whose ids are not the tokenizer's / do not fit the LLM: one error naming both, before any
    backbone loads (it used to be `IndexError: index out of range in self` in the first forward)."""
    files = build_tiny_release(tmp_path / "release", tiny_backbones)
    convert_original_release(files["checkpoint"], files["model_args"], tmp_path / "out", with_processor=True)
    config_file = tmp_path / "out" / "config.json"
    good = json.loads(config_file.read_text())

    def no_backbones(*args, **kwargs):
        raise AssertionError("the backbones loaded before the ids were checked")

    monkeypatch.setattr(GILLForConditionalGeneration, "_load_backbones", staticmethod(no_backbones))
    shifted = [i + 1 for i in good["img_token_ids"]]
    config_file.write_text(json.dumps({**good, "img_token_ids": shifted, "image_token_id": shifted[0] - 1}))
    message = f"GILLConfig.img_token_ids are {shifted} but the tokenizer saved in {tmp_path / 'out'} gives " \
              f"[IMG0..7] the ids {good['img_token_ids']}"
    with pytest.raises(ValueError, match=re.escape(message)):
        GILLForConditionalGeneration.from_pretrained(tmp_path / "out")
    (tmp_path / "out" / "processor_config.json").unlink()  # no tokenizer saved: the LLM's size still catches it
    config_file.write_text(json.dumps({**good, "img_token_ids": IMG_IDS, "image_token_id": 50265}))
    with pytest.raises(ValueError, match=r"reach id 50273 but the LLM's input embeddings have 512 rows"):
        GILLForConditionalGeneration.from_pretrained(tmp_path / "out")
    monkeypatch.undo()

    config_file.write_text(json.dumps(good))
    model = GILLForConditionalGeneration.from_pretrained(tmp_path / "out")
    other = GILLProcessor(CLIPImageProcessor.from_pretrained(tiny_backbones["clip"]),
                          AutoTokenizer.from_pretrained(tiny_backbones["opt"]), num_img_tokens=7)
    with pytest.raises(ValueError, match="the processor has num_img_tokens=7 but the model's config 8"):
        model.processor = other
    extra = AutoTokenizer.from_pretrained(tiny_backbones["opt"])
    extra.add_tokens(["<extra>"])  # an ordinary token beyond the LLM's 512 rows, before GILL's
    with pytest.raises(ValueError, match=r"GILLConfig.img_token_ids are \[513, .*\] but the processor's tokenizer "
                                         r"gives \[IMG0..7\] the ids \[514, "):
        model.processor = GILLProcessor(CLIPImageProcessor.from_pretrained(tiny_backbones["clip"]), extra)
    assert model.processor is None


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_index_dtype(tmp_path, dtype):
    checkpoint = save_release(cheap_release(), tmp_path / "ckpt.pth.tar")
    rng = np.random.default_rng(1)
    embeddings = rng.standard_normal((4, 256)).astype(np.float32)
    with open(tmp_path / "cc3m_embeddings_urls.npy", "wb") as handle:
        pickle.dump({"paths": [f"{i}.jpg" for i in range(4)], "embeddings": list(embeddings)}, handle)
    assert cli_main(["convert-original", "--checkpoint", str(checkpoint), "--model-args", str(MODEL_ARGS),
                     "--embeddings", str(tmp_path / "cc3m_embeddings_urls.npy"), "--index-dtype", dtype,
                     "--out", str(tmp_path / "out")]) == 0
    index = RetrievalIndex.load(tmp_path / "out" / "retrieval_index")
    assert index.embeddings.dtype == getattr(torch, dtype)
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    np.testing.assert_allclose(index.embeddings.float().numpy(), unit, atol=1e-7 if dtype == "float32" else 2e-3)


def test_index_dtype_refusals(tmp_path):
    with pytest.raises(ValueError, match="index_dtype must be one of \\['float16', 'float32'\\], got 'bfloat16'"):
        convert_original_release(tmp_path / "c.pth.tar", MODEL_ARGS, tmp_path / "out", embeddings=tmp_path / "e.npy",
                                 index_dtype="bfloat16")
    with pytest.raises(ValueError, match="index_dtype sets the storage of the retrieval index: it needs embeddings"):
        convert_original_release(tmp_path / "c.pth.tar", MODEL_ARGS, tmp_path / "out", index_dtype="float32")
    assert not (tmp_path / "out").exists()


def test_original_semantics_of_the_real_release_offline(tmp_path, caplog):
    """OPT-6.7B already has a row for <|image|> (50265 < 50272): no resize, no tokenizer needed (offline, the ids of
    model_args.json are kept, with a warning)."""
    checkpoint = save_release(cheap_release(), tmp_path / "ckpt.pth.tar")
    with caplog.at_level(logging.WARNING, logger="gill_hf.convert_original"):
        summary = convert_original_release(checkpoint, MODEL_ARGS, tmp_path / "out", original_semantics=True)
    assert "cannot load the tokenizer 'facebook/opt-6.7b'" in caplog.text
    config = GILLConfig.from_pretrained(tmp_path / "out")
    assert (config.mask_image_token_logit, config.packed_lp_first_caption_only) == (False, True)
    assert config.text_config.vocab_size == 50272 and config.image_token_id == 50265
    assert config.img_token_ids == IMG_IDS and summary["original_semantics"]
