"""convert-minigpt5: synthetic Lightning checkpoints with MiniGPT-5's key layout at tiny widths -> gill_hf folder."""

import json
import os

import pytest
import torch
from torch import nn

from gill_hf import GILLForConditionalGeneration
from gill_hf.cli import main
from gill_hf.convert_minigpt5 import convert_minigpt5
from gill_hf.loading import peft_on_transformers5

NEW = 9  # [IMG0..7] + <ImageHere>


class Evil:
    """Unpickling this would run a shell command: the converter must never do it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class LightningLike(dict):
    """Stands for Lightning's AttributeDict in hyper_parameters (a class the reader does not know)."""


def minigpt5_modules(llm_width: int, width: int, seed: int):
    """fc, the mapper transformer and the queries exactly as MiniGPT-5 builds them (at tiny widths)."""
    torch.manual_seed(seed)
    fc = nn.Sequential(nn.Linear(llm_width, width), nn.GELU(), nn.Linear(width, width))
    layer = nn.TransformerEncoderLayer(width, 8, 4 * width, 0.0, batch_first=True, norm_first=True)
    encoder = nn.TransformerEncoder(layer, 4, norm=nn.LayerNorm(width), enable_nested_tensor=False)  # no warning
    mapping = nn.Transformer(d_model=width, nhead=8, num_encoder_layers=4, num_decoder_layers=4,
                             dim_feedforward=4 * width, dropout=0.0, norm_first=True, batch_first=True,
                             custom_encoder=encoder)
    return fc, mapping, torch.randn(1, 77, width)


def lightning_checkpoint(path, state_dict, marker):
    torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "2.1.0", "state_dict": state_dict,
                "hyper_parameters": LightningLike(lr=2e-5, evil=Evil(marker)),
                "optimizer_states": [{"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": []}]}, path)
    return path


@pytest.fixture(scope="module")
def release(tiny_backbones, tmp_path_factory):
    """Stage-1 and stage-2 checkpoints on the tiny Llama / CLIP / SD backbones, and the modules behind them."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, CLIPTextConfig

    folder = tmp_path_factory.mktemp("minigpt5")
    marker = folder / "PWNED"
    llm = AutoModelForCausalLM.from_pretrained(tiny_backbones["llama"])
    vocab, e = llm.config.vocab_size, llm.config.hidden_size
    width = CLIPTextConfig.from_pretrained(os.path.join(tiny_backbones["sd"], "text_encoder")).hidden_size
    fc, mapping, queries = minigpt5_modules(e, width, seed=1)
    g = torch.Generator().manual_seed(2)
    embed, head = torch.randn(vocab + NEW, e, generator=g), torch.randn(vocab + NEW, e, generator=g)
    stage1 = {"model.llama_model.model.embed_tokens.weight": embed, "model.llama_model.lm_head.weight": head,
              "t2i_decoder_prompt": queries, **{f"fc.{k}": v for k, v in fc.state_dict().items()},
              **{f"llm_to_t2i_mapping.{k}": v for k, v in mapping.state_dict().items()}}
    # stage 2: real peft LoRA + modules_to_save on the resized LLM; the trainable tensors, as Lightning saves them
    llm.resize_token_embeddings(vocab + NEW, mean_resizing=False)
    with peft_on_transformers5():
        peft_model = get_peft_model(llm, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, bias="none",
                                                    target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                                    modules_to_save=["lm_head", "embed_tokens"]))
    with torch.no_grad():  # trained: LoRA, and (grad-masked) only the new rows of the modules_to_save copies
        for name, p in peft_model.named_parameters():
            if p.requires_grad:
                rows = p[-NEW:] if "modules_to_save" in name else p
                rows.copy_(torch.randn(rows.shape, generator=g) * 0.1)
    _, mapping2, _ = minigpt5_modules(e, width, seed=3)
    stage2 = {f"model.llama_model.{k}": v.detach().clone() for k, v in peft_model.named_parameters()
              if v.requires_grad}
    stage2.update({f"llm_to_t2i_mapping.{k}": v for k, v in mapping2.state_dict().items()})
    return {"stage1": lightning_checkpoint(folder / "stage1_cc3m.ckpt", stage1, marker),
            "stage2": lightning_checkpoint(folder / "stage2_vist.ckpt", stage2, marker),
            "marker": marker, "vocab": vocab, "fc": fc, "mapping": mapping, "mapping2": mapping2,
            "queries": queries, "embed": embed, "head": head, "peft": peft_model.eval(), "state1": stage1,
            "state2": stage2}


def backbones(tiny_backbones):
    return dict(text_model=tiny_backbones["llama"], vision_model=tiny_backbones["clip"],
                diffusion_model=tiny_backbones["sd"])


def reference_mapper(fc, mapping, queries, states):
    """MiniGPT-5's mapping: fc over the 8 voken states, then the transformer with the queries as decoder input."""
    src = fc(states)
    return mapping(src, queries.expand(src.shape[0], -1, -1))


def test_stage1_and_stage2_convert_to_a_loadable_model(release, tiny_backbones, tmp_path):
    vocab = release["vocab"]
    summary = convert_minigpt5(release["stage1"], tmp_path / "s1", **backbones(tiny_backbones))
    assert summary["skipped_globals"] == sorted({f"{__name__}.LightningLike", "posix.system"})
    assert not release["marker"].exists()  # the malicious hyper_parameters entry never ran
    model = GILLForConditionalGeneration.from_pretrained(tmp_path / "s1")
    cfg = model.config
    assert (cfg.voken_feature_position, cfg.mapper_add_input_embeddings, cfg.mapper_input_proj) == \
        ("predicting", False, "mlp")
    assert (cfg.img_token_loss_weight, cfg.ldm_loss_weight, cfg.gen_loss_weight, cfg.cfg_dropout_prob) == \
        (0.01, 1.0, 0.1, 0.1)
    assert not cfg.use_lora and cfg.training_stage == "align"
    assert torch.equal(model.adapter.img_embeddings, release["embed"][vocab:vocab + 8])
    assert torch.equal(model.adapter.img_output_embeddings, release["head"][vocab:vocab + 8])
    states = torch.randn(3, 8, cfg.llm_feature_dim)
    with torch.no_grad():
        expected = reference_mapper(release["fc"], release["mapping"], release["queries"], states)
        torch.testing.assert_close(model.adapter.mapper(states), expected, rtol=1e-5, atol=1e-5)
    assert model.processor.apply_chat_template([{"role": "user", "content": "hi"}],
                                               add_generation_prompt=True) == "###Human: hi ###Assistant:"

    summary = convert_minigpt5(release["stage1"], tmp_path / "s2", release["stage2"], **backbones(tiny_backbones))
    assert summary["lora_tensors"] == 8  # 2 layers x q/v x A/B
    model2 = GILLForConditionalGeneration.from_pretrained(tmp_path / "s2")
    assert model2.config.use_lora and model2.config.training_stage == "interleaved"
    s2 = release["state2"]
    rows = s2["model.llama_model.base_model.model.model.embed_tokens.modules_to_save.default.weight"]
    assert torch.equal(model2.adapter.img_embeddings, rows[vocab:vocab + 8])
    with torch.no_grad():  # stage 2's mapper transformer, stage 1's fc and queries
        expected = reference_mapper(release["fc"], release["mapping2"], release["queries"], states)
        torch.testing.assert_close(model2.adapter.mapper(states), expected, rtol=1e-5, atol=1e-5)
        ids = torch.randint(3, vocab, (2, 7), generator=torch.Generator().manual_seed(0))
        # LoRA: the converted LLM's logits over the old vocabulary are the peft model's
        ours = model2.language_model(input_ids=ids).logits
        theirs = release["peft"](input_ids=ids).logits[..., :vocab]
        torch.testing.assert_close(ours[..., :vocab], theirs, rtol=1e-5, atol=1e-5)


def test_bad_checkpoints_are_refused_before_writing(release, tiny_backbones, tmp_path):
    kwargs = backbones(tiny_backbones)
    with pytest.raises(ValueError, match=r"not a MiniGPT-5 stage-1 checkpoint .*it is a stage-2 checkpoint"):
        convert_minigpt5(release["stage2"], tmp_path / "a", **kwargs)
    with pytest.raises(ValueError, match="stage-2 checkpoint for these backbones .*it is a stage-1 checkpoint"):
        convert_minigpt5(release["stage1"], tmp_path / "a", release["stage1"], **kwargs)
    other = lightning_checkpoint(tmp_path / "other.ckpt", {"encoder.weight": torch.ones(2)}, release["marker"])
    with pytest.raises(ValueError, match="match neither MiniGPT-5 stage"):
        convert_minigpt5(other, tmp_path / "a", **kwargs)
    # widths of another backbone: the mapper was built for a 16-wide diffusion text encoder
    fc, mapping, queries = minigpt5_modules(64, 16, seed=0)
    data = dict(release["state1"])
    data.update({"t2i_decoder_prompt": queries, **{f"fc.{k}": v for k, v in fc.state_dict().items()},
                 **{f"llm_to_t2i_mapping.{k}": v for k, v in mapping.state_dict().items()}})
    narrow = lightning_checkpoint(tmp_path / "narrow.ckpt", data, release["marker"])
    with pytest.raises(ValueError, match=r"wrong shapes \(\d+\): fc.0.bias: \(16,\), expected \(32,\)"):
        convert_minigpt5(narrow, tmp_path / "a", **kwargs)
    evil_tensor = lightning_checkpoint(tmp_path / "evil.ckpt", {"t2i_decoder_prompt": Evil(release["marker"])},
                                       release["marker"])
    with pytest.raises(ValueError, match=r"not under str keys: t2i_decoder_prompt \(<skipped posix.system>\)"):
        convert_minigpt5(evil_tensor, tmp_path / "a", **kwargs)
    int_key = lightning_checkpoint(tmp_path / "int_key.ckpt", {**release["state1"], 7: torch.ones(1)},
                                   release["marker"])
    with pytest.raises(ValueError, match=r"not under str keys: 7 \(Tensor\)"):
        convert_minigpt5(int_key, tmp_path / "a", **kwargs)
    assert not (tmp_path / "a").exists() and not release["marker"].exists()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not an empty folder"):
        convert_minigpt5(release["stage1"], tmp_path / "full", **kwargs)


def test_cli(release, tiny_backbones, tmp_path, capsys):
    args = ["convert-minigpt5", "--stage1", str(release["stage1"]), "--llm", tiny_backbones["llama"],
            "--vision", tiny_backbones["clip"], "--diffusion", tiny_backbones["sd"]]
    assert main(args + ["--stage2", str(tmp_path / "nope.ckpt"), str(tmp_path / "out")]) == 2
    assert "--stage2: no such file or folder" in capsys.readouterr().err
    assert main(args + [str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["stages"] == [1]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_blip2_input_side_takes_minigpt4s_llama_proj(release, tiny_backbones, tmp_path):
    from gill_hf.tiny import build_tiny_vision_encoder

    blip2 = build_tiny_vision_encoder(tmp_path / "vision", "blip2")  # Q-Former 48 wide, 6 queries
    kwargs = {**backbones(tiny_backbones), "vision_model": blip2}
    g = torch.Generator().manual_seed(5)
    proj = {"llama_proj.weight": torch.randn(64, 48, generator=g), "llama_proj.bias": torch.randn(64, generator=g)}
    minigpt4 = tmp_path / "prerained_minigpt4_7b.pth"
    torch.save({"model": proj, "optimizer": None, "config": Evil(release["marker"]), "epoch": 3}, minigpt4)
    with pytest.raises(ValueError, match="goes with a BLIP-2 vision backbone and only with one; got no minigpt4"):
        convert_minigpt5(release["stage1"], tmp_path / "out", **kwargs)
    with pytest.raises(ValueError, match="got minigpt4 with .*'clip_pooled'"):
        convert_minigpt5(release["stage1"], tmp_path / "out", minigpt4=minigpt4, **backbones(tiny_backbones))
    wide = tmp_path / "wide.pth"
    torch.save({"model": {"llama_proj.weight": torch.ones(64, 32), "llama_proj.bias": torch.ones(64)}}, wide)
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): llama_proj.weight: \(64, 32\), expected \(64, 48\)"):
        convert_minigpt5(release["stage1"], tmp_path / "out", minigpt4=wide, **kwargs)
    assert not (tmp_path / "out").exists()

    summary = convert_minigpt5(release["stage1"], tmp_path / "out", minigpt4=minigpt4, **kwargs)
    assert summary["visual_encoder"] == "blip2_qformer" and not release["marker"].exists()
    model = GILLForConditionalGeneration.from_pretrained(tmp_path / "out")
    cfg = model.config
    assert (cfg.visual_encoder, cfg.visual_projection, cfg.train_visual_projection, cfg.num_visual_tokens) == \
        ("blip2_qformer", "linear", False, 6)
    pixels = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        features = model.encode_images(pixels)  # (2, 6, 48) Q-Former outputs
        expected = torch.nn.functional.linear(features, proj["llama_proj.weight"], proj["llama_proj.bias"])
        torch.testing.assert_close(model.visual_prefix(features), expected)



def test_torchscript_archive_is_refused_unloaded(tmp_path):
    """torch.load hands a zip holding constants.pkl (a TorchScript archive) to torch.jit.load, which runs the
    archive's code (its __setstate__ methods): refused before torch.load sees it."""
    import zipfile

    from gill_hf.safe_pickle import load_tensor_checkpoint

    path = tmp_path / "scripted.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}}, path)
    assert load_tensor_checkpoint(path)[0]["state_dict"]["w"].tolist() == [1.0, 1.0]
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("scripted/constants.pkl", b"")
    with pytest.raises(ValueError, match=r"scripted.ckpt is a TorchScript archive .*would run its code"):
        load_tensor_checkpoint(path)
