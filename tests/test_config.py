import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from gill_hf import GILLConfig, count_adapter_parameters
from gill_hf.configuration_gill import gill_paper_config


def test_defaults_are_the_released_gill_values():
    cfg = GILLConfig()
    assert (cfg.num_visual_tokens, cfg.num_img_tokens, cfg.ret_emb_dim) == (4, 8, 256)
    assert (cfg.mapper_type, cfg.mapper_hidden_dim, cfg.mapper_num_heads) == ("gill_mapper", 512, 4)
    assert (cfg.mapper_encoder_layers, cfg.mapper_decoder_layers, cfg.num_gen_queries, cfg.gen_emb_dim) == (4, 4, 77, 768)
    assert (cfg.text_model_name_or_path, cfg.vision_model_name_or_path) == ("facebook/opt-6.7b",
                                                                            "openai/clip-vit-large-patch14")
    assert cfg.gen_loss_type == "l2" and cfg.hidden_layer == -1 and cfg.voken_feature_position == "at_token"
    assert not cfg.use_lora and cfg.cfg_dropout_prob == 0.0 and cfg.ldm_loss_weight == 0.0
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.text_config.model_type == "opt" and cfg.vision_config.model_type == "clip_vision_model"


@pytest.mark.parametrize("field,value,message", [
    ("num_img_tokens", 0, "num_img_tokens must be >= 1"),
    ("mapper_type", "lstm", "mapper_type.*expected one of"),
    ("gen_loss_type", "l1", "gen_loss_type.*expected one of"),
    ("voken_feature_position", "after", "voken_feature_position.*expected one of"),
    ("pack_prob", 1.5, "pack_prob must lie in"),
    ("cfg_dropout_prob", -0.1, "cfg_dropout_prob must lie in"),
    ("mapper_num_heads", 3, "divisible by"),
    ("ret_loss_weight", -1.0, "ret_loss_weight must be >= 0"),
    ("img_token_ids", [1, 2, 3], "has 3 ids but num_img_tokens is 8"),
    ("img_token_ids", [5] * 8, "must be distinct"),
    ("hidden_layer", 99, "out of range"),
    ("ldm_snr_gamma", 0.0, "ldm_snr_gamma must be > 0"),
])
def test_bad_values_raise_clear_errors(field, value, message):
    with pytest.raises(StrictDataclassError, match=f"(?s){message}"):
        GILLConfig(**{field: value})


def test_round_trip_and_auto_registration(tmp_path):
    cfg = gill_paper_config(pack_prob=0.25)
    cfg.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, GILLConfig)
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(again.to_dict()) == drop(cfg.to_dict())
    assert again.img_token_ids == list(range(50266, 50274)) and again.text_config.hidden_size == 4096


def test_paper_parameter_count_matches_the_release():
    counts = count_adapter_parameters(gill_paper_config())
    # The released checkpoint's 137 tensors hold 50,096,385 values; we add the decision head Linear(4096, 2).
    assert counts["total"] - counts["decision_head"] == 50_096_385
    assert counts["decision_head"] == 4096 * 2 + 2
    assert counts["w_cap"] == 1024 * 4 * 4096 + 4 * 4096 and counts["img_embeddings"] == 8 * 4096
    print(f"\npaper configuration: {counts['total']:,} trainable parameters")


def test_ablation_mappers_and_widths_from_configs():
    for kind in ("linear", "mlp", "transformer_encoder"):
        assert count_adapter_parameters(gill_paper_config(mapper_type=kind))["mapper"] > 0
    linear = count_adapter_parameters(gill_paper_config(mapper_type="linear"))["mapper"]
    assert linear == 4096 * 768 + 768 + 8 * 77 + 77  # per-token e->D, then the r->L token mix
