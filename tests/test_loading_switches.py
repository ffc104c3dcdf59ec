"""The standard transformers loading switches on GILL: dtype / torch_dtype / "auto", attn_implementation (per
backbone), device_map, quantization_config (torchao int8 weight-only on CPU), output_loading_info, bad input
rejected before any weights load; and the embedding accessors with resize_token_embeddings."""

import inspect

import pytest
import torch
from conftest import SMALL_MAPPER
from transformers import AutoModelForCausalLM, CLIPVisionModel, TorchAoConfig

from gill_hf import GILLForConditionalGeneration
from gill_hf.training import CaptionImageDataset, train_gill
from gill_hf.toy_world import write_toy_cc3m

QUIET = dict(disable_tqdm=True, logging_steps=1, per_device_train_batch_size=4, dataloader_num_workers=0,
             use_cpu=True, seed=0)


def objective(model, batch):
    """The Eq. 5 outputs (``gill_objective=True`` once forward has it, else the old training forward)."""
    if "gill_objective" in inspect.signature(model.forward).parameters:
        return model(**batch, pack=False, gill_objective=True)
    return model(**batch, pack=False)


def build(tiny_backbones, llm="opt", **kwargs):
    torch.manual_seed(0)
    return GILLForConditionalGeneration.from_backbones(tiny_backbones[llm], tiny_backbones["clip"],
                                                       tiny_backbones["sd"], **SMALL_MAPPER, **kwargs)


@pytest.fixture(scope="module")
def saved(tiny_backbones, tmp_path_factory):
    """A saved tiny GILL (fp32 backbones on disk) whose LLM pointer can be swapped for a bf16 copy."""
    path = tmp_path_factory.mktemp("gill")
    build(tiny_backbones).save_pretrained(path)
    bf16_llm = tmp_path_factory.mktemp("opt_bf16")
    AutoModelForCausalLM.from_pretrained(tiny_backbones["opt"], dtype=torch.bfloat16).save_pretrained(bf16_llm)
    return path, bf16_llm


@pytest.mark.parametrize("switch", [dict(dtype=torch.bfloat16), dict(dtype="bfloat16"), dict(dtype="bf16"),
                                    dict(torch_dtype=torch.bfloat16), dict(torch_dtype="bfloat16")])
def test_dtype_spellings_reach_both_backbones(tiny_backbones, switch):
    model = build(tiny_backbones, **switch)
    assert model.language_model.dtype == model.vision_model.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.adapter.parameters())  # a fresh adapter trains in fp32


def test_dtype_auto_keeps_each_saved_dtype(saved):
    path, bf16_llm = saved
    from gill_hf import GILLConfig

    config = GILLConfig.from_pretrained(path)
    config.text_model_name_or_path = str(bf16_llm)
    model = GILLForConditionalGeneration.from_pretrained(path, config=config, dtype="auto")
    assert model.language_model.dtype == torch.bfloat16  # saved in bf16
    assert model.vision_model.dtype == torch.float32  # saved in fp32
    assert model.adapter.w_cap.weight.dtype == torch.float32  # the adapter file's dtype
    fp32 = GILLForConditionalGeneration.from_pretrained(path, config=config, dtype="float32")
    assert fp32.language_model.dtype == torch.float32
    with pytest.raises(ValueError, match="disagree"):
        GILLForConditionalGeneration.from_pretrained(path, dtype=torch.float16, torch_dtype=torch.bfloat16)


def test_attn_implementation_device_map_and_loading_info(saved, monkeypatch):
    path, _ = saved
    seen = []
    original = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    model, info = GILLForConditionalGeneration.from_pretrained(
        path, attn_implementation={"text_config": "eager", "vision_config": "sdpa"}, device_map="cpu",
        output_loading_info=True)
    assert model.language_model.config._attn_implementation == "eager"
    assert model.vision_model.config._attn_implementation == "sdpa"
    assert seen[0]["device_map"] == "cpu" and model.vision_model.device == model.language_model.device
    assert set(info) == {"missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"}
    assert all(v == [] for v in info.values())
    both = GILLForConditionalGeneration.from_pretrained(path, attn_implementation="eager")
    assert both.language_model.config._attn_implementation == both.vision_model.config._attn_implementation == "eager"
    only_vision = GILLForConditionalGeneration.from_pretrained(path, attn_implementation={"": "sdpa",
                                                                                          "vision_config": "eager"})
    assert only_vision.language_model.config._attn_implementation == "sdpa"
    assert only_vision.vision_model.config._attn_implementation == "eager"


def test_unknown_kwargs_are_errors_naming_them(saved, tiny_backbones):
    path, _ = saved
    with pytest.raises(TypeError, match=r"'revison' \(did you mean 'revision'\?\)"):
        GILLForConditionalGeneration.from_pretrained(path, revison="main")
    with pytest.raises(TypeError, match=r"'attn_implementaton' \(did you mean 'attn_implementation'\?\)"):
        GILLForConditionalGeneration.from_pretrained(path, attn_implementaton="eager")
    with pytest.raises(TypeError, match=r"'mapper_hiden_dim' \(did you mean 'mapper_hidden_dim'\?\)"):
        build(tiny_backbones, mapper_hiden_dim=16)


@pytest.fixture
def no_weights_load(monkeypatch):
    """Fails the test if either backbone starts loading."""
    def refuse(*args, **kwargs):
        raise AssertionError("a backbone started loading before the bad input was rejected")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(CLIPVisionModel, "from_pretrained", refuse)


def test_bad_switches_fail_before_any_weights_load(saved, no_weights_load, monkeypatch):
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    from transformers import BitsAndBytesConfig

    path, _ = saved
    cases = [
        (dict(dtype="int8"), "not a floating dtype"),
        (dict(attn_implementation="sdpaa"), "did you mean 'sdpa'"),
        (dict(attn_implementation="flash_attention_2"), r"flash_attention_2.*language model.*needs a package"),
        (dict(attn_implementation={"vison_config": "eager"}), r"\['vison_config'\] name no GILL backbone"),
        (dict(quantization_config=TorchAoConfig(Int4WeightOnlyConfig()), dtype=torch.float32),
         "runs in bfloat16 only"),
        (dict(quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), dtype=torch.float64), "float64"),
        (dict(quantization_config=BitsAndBytesConfig(load_in_4bit=True)), "bitsandbytes is not installed"),
        (dict(quantization_config=TorchAoConfig(Int8WeightOnlyConfig()), language_model=torch.nn.Linear(1, 1)),
         "passed in memory"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            GILLForConditionalGeneration.from_pretrained(path, **kwargs)
    monkeypatch.setattr(CLIPVisionModel, "_supports_flex_attn", False)  # a vision encoder lacking it
    with pytest.raises(ValueError, match=r"vision encoder \(CLIPVisionModel\) does not support.*flex_attention"):
        GILLForConditionalGeneration.from_pretrained(path, attn_implementation="flex_attention")


def test_torchao_int8_llm_trains_the_adapter_and_generates(tiny_backbones, tmp_path):
    from torchao.quantization import Int8WeightOnlyConfig

    model = build(tiny_backbones, dtype=torch.bfloat16, quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    linears = [m for m in model.language_model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in linears if type(m.weight).__name__ == "Int8Tensor"]
    assert len(quantized) == 2 * 6  # 2 layers x q, k, v, out, fc1, fc2 (tied lm_head stays bf16)
    assert all(p.dtype == torch.float32 for p in model.adapter.parameters())  # adapters in full precision
    before = model.adapter.w_cap.weight.detach().clone()
    ds = CaptionImageDataset.from_tsv(write_toy_cc3m(tmp_path / "data", 8))
    trainer = train_gill(model, ds, str(tmp_path / "run"), max_steps=2, bf16=True, **QUIET)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, model.adapter.w_cap.weight)
    assert type(model.language_model.model.decoder.layers[0].fc1.weight).__name__ == "Int8Tensor"
    enc = model.processor.tokenizer(["a red circle"], return_tensors="pt")
    model.eval()
    generated = model.generate(**enc, max_new_tokens=3, do_sample=False)
    sequences = getattr(generated, "sequences", generated)
    assert sequences.shape[-1] >= enc["input_ids"].shape[-1] + 1

    model.save_pretrained(tmp_path / "saved")
    again = GILLForConditionalGeneration.from_pretrained(tmp_path / "saved", dtype=torch.bfloat16,
                                                         quantization_config=TorchAoConfig(Int8WeightOnlyConfig()))
    assert type(again.language_model.model.decoder.layers[0].fc1.weight).__name__ == "Int8Tensor"
    assert again.adapter.w_cap.weight.dtype == torch.float32  # not cast to bf16 under quantization
    torch.testing.assert_close(again.adapter.w_cap.weight, model.adapter.w_cap.weight)


# ---------------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("llm", ["opt", "llama"])
def test_embedding_accessors_and_resize_keep_img_rows(tiny_backbones, caption_batch, tmp_path, llm):
    model = build(tiny_backbones, llm).eval()
    assert model.get_input_embeddings() is model.language_model.get_input_embeddings()
    assert isinstance(model.get_input_embeddings(), torch.nn.Embedding)
    assert model.get_output_embeddings() is model.language_model.get_output_embeddings()
    batch = caption_batch(model)
    with torch.no_grad():
        before = objective(model, batch)
    norm = model._mean_frozen_row_norm("input")
    ids = model.img_token_ids

    vocab = len(model.processor.tokenizer)  # the LLM's vocabulary + GILL's [IMG] and placeholder tokens
    assert model.get_input_embeddings().weight.shape[0] < vocab
    resized = model.resize_token_embeddings(vocab)
    assert resized.weight.shape[0] == vocab == model.config.text_config.vocab_size
    torch.testing.assert_close(resized.weight[ids], model.adapter.img_embeddings)
    if model.adapter.img_output_embeddings is not None:
        torch.testing.assert_close(model.get_output_embeddings().weight[ids], model.adapter.img_output_embeddings)
    assert model._mean_frozen_row_norm("input") == pytest.approx(norm, rel=1e-6)  # target excludes GILL's rows
    with torch.no_grad():
        after = objective(model, batch)
    for name in ("loss", "caption_loss", "img_token_loss", "gen_loss", "ret_loss"):
        torch.testing.assert_close(after[name], before[name], msg=name)

    with torch.no_grad():  # training moves E_img; the renormalisation after each step keeps the rows equal
        model.adapter.img_embeddings.mul_(3.0)
    model.renormalize_img_embeddings()
    torch.testing.assert_close(model.get_input_embeddings().weight[ids], model.adapter.img_embeddings)

    model.save_pretrained(tmp_path)
    again = GILLForConditionalGeneration.from_pretrained(tmp_path)
    assert again.get_input_embeddings().weight.shape[0] == vocab
    torch.testing.assert_close(again.get_input_embeddings().weight[ids], model.adapter.img_embeddings)
    with torch.no_grad():
        torch.testing.assert_close(objective(again, batch).loss, objective(model, batch).loss)

    replacement = torch.nn.Embedding(vocab, model.config.llm_embed_dim)
    model.set_input_embeddings(replacement)
    assert model.get_input_embeddings() is replacement
    torch.testing.assert_close(replacement.weight[ids], model.adapter.img_embeddings)
