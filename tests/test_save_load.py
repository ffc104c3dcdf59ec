import json
import os

import pytest
import safetensors.torch
import torch
from transformers import AutoModelForImageTextToText

from gill_hf import GILLConfig, GILLForConditionalGeneration, GILLProcessor


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        return model(**batch, gill_objective=True, pack=False)


@pytest.mark.parametrize("llm", ["opt", "llama"])
def test_save_load_round_trip_is_exact_and_adapter_only(make_model, caption_batch, tmp_path, llm):
    model = make_model(llm, seed=3)
    batch = caption_batch(model)
    before = _outputs(model, batch)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["config.json", "generation_config.json", "gill_manifest.json", "model.safetensors", "processor_config.json",
         "tokenizer.json", "tokenizer_config.json"])
    saved = safetensors.torch.load_file(tmp_path / "model.safetensors")
    assert set(saved) == set(model.adapter_state_dict()) and all(k.startswith("adapter.") for k in saved)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "gill" and config["text_model_name_or_path"].endswith(llm)

    again = GILLForConditionalGeneration.from_pretrained(tmp_path)
    after = _outputs(again, batch)
    for name in ("loss", "caption_loss", "img_token_loss", "gen_loss", "ret_loss", "gen_embeds", "text_embeds"):
        assert torch.equal(before[name], after[name]), name
    for key, value in model.state_dict().items():  # backbones come from their own folders, untouched
        assert torch.equal(value, again.state_dict()[key]), key
    assert isinstance(again.processor, GILLProcessor)
    assert again.processor.img_token_ids == model.config.img_token_ids
    auto = AutoModelForImageTextToText.from_pretrained(tmp_path)  # the Auto path is the same loader
    assert torch.equal(_outputs(auto, batch).gen_embeds, after.gen_embeds)


def test_load_respects_dtype_and_keeps_backbones_from_disk(make_model, tiny_backbones, tmp_path):
    model = make_model("opt")
    model.save_pretrained(tmp_path)
    bf16 = GILLForConditionalGeneration.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.language_model.dtype == bf16.vision_model.dtype == torch.bfloat16
    assert bf16.adapter.w_cap.weight.dtype == torch.bfloat16
    on_disk = safetensors.torch.load_file(os.path.join(tiny_backbones["opt"], "model.safetensors"))
    loaded = GILLForConditionalGeneration.from_pretrained(tmp_path).language_model.state_dict()
    for key, value in on_disk.items():
        assert torch.equal(loaded[key], value), key  # no re-initialisation of a loaded backbone


def test_adapter_checkpoint_mismatches_are_listed(make_model, tmp_path):
    model = make_model("opt")
    model.save_pretrained(tmp_path)
    good = safetensors.torch.load_file(tmp_path / "model.safetensors")

    def load_with(state):  # a hand-edited folder: no manifest any more
        (tmp_path / "gill_manifest.json").unlink(missing_ok=True)
        safetensors.torch.save_file(state, tmp_path / "model.safetensors")
        return GILLForConditionalGeneration.from_pretrained(tmp_path)

    broken = dict(good)
    del broken["adapter.w_t2i.bias"], broken["adapter.logit_scale"]
    with pytest.raises(ValueError, match=r"missing keys \(2\): \['adapter.logit_scale', 'adapter.w_t2i.bias'\]"):
        load_with(broken)
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): \['language_model.lm_head.weight'\]"):
        load_with({**good, "language_model.lm_head.weight": torch.zeros(2, 2)})
    wrong = {**good, "adapter.w_i2t.weight": torch.zeros(7, 32)}
    with pytest.raises(ValueError, match=r"wrong shapes \(1\): \['adapter.w_i2t.weight: checkpoint \(7, 32\) vs model "
                                         r"\(256, 32\)'\]"):
        load_with(wrong)


def test_missing_backbone_pointer_is_an_error_not_a_random_llm(make_model, tmp_path):
    model = make_model("opt")
    model.config.text_model_name_or_path = None
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="text_model_name_or_path is empty"):
        GILLForConditionalGeneration.from_pretrained(tmp_path)


def test_untrained_tokens_config_is_rejected():
    with pytest.raises(ValueError, match="from_backbones"):
        GILLForConditionalGeneration(GILLConfig())


def test_save_writes_nothing_half_done(make_model, tmp_path, monkeypatch):
    model = make_model("opt")
    target = tmp_path / "out"

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(model.processor, "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        model.save_pretrained(target)
    assert os.listdir(target) == [] and [p.name for p in tmp_path.iterdir()] == ["out"]  # no staging left over


def test_trainer_style_state_dict_is_filtered(make_model, tmp_path):
    model = make_model("opt")
    model.save_pretrained(tmp_path, state_dict=model.state_dict())  # what Trainer._save passes
    assert set(safetensors.torch.load_file(tmp_path / "model.safetensors")) == set(model.adapter_state_dict())
    size_mb = os.path.getsize(tmp_path / "model.safetensors") / 2**20
    assert size_mb < 1.0, size_mb  # the adapter only, never the LLM


def test_a_new_save_replaces_every_file_of_the_previous_one(make_model, tmp_path):
    model = make_model("opt", seed=4)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    sharded = GILLForConditionalGeneration.from_pretrained(tmp_path)
    for key, value in model.adapter_state_dict().items():
        assert torch.equal(sharded.adapter_state_dict()[key], value), key
    (tmp_path / "notes.txt").write_text("not part of any save")
    other = make_model("opt", seed=5)
    other.save_pretrained(tmp_path)  # one file now: the old shards and index go, files no save wrote stay
    assert not list(tmp_path.glob("model-*.safetensors")) and not (tmp_path / "model.safetensors.index.json").exists()
    assert (tmp_path / "notes.txt").read_text() == "not part of any save"
    manifest = json.loads((tmp_path / "gill_manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(p.name for p in tmp_path.iterdir()
                                               if p.name not in ("gill_manifest.json", "notes.txt"))
    loaded = GILLForConditionalGeneration.from_pretrained(tmp_path)
    for key, value in other.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key


def test_only_the_main_process_writes(make_model, tmp_path):
    make_model("opt").save_pretrained(tmp_path / "rank1", is_main_process=False)  # as transformers' other ranks
    assert not (tmp_path / "rank1").exists()
