import pytest
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoConfig

from gill_hf import GILLConfig, count_adapter_parameters
from gill_hf.configuration_gill import ORIGINAL_SEMANTICS, gill_paper_config
from gill_hf.tiny import build_tiny_tokenizer
from gill_hf.token_ids import add_gill_tokens, check_token_ids


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


def test_cross_entropy_switches_default_to_gill_hf_and_round_trip(tmp_path):
    cfg = GILLConfig()
    assert cfg.mask_image_token_logit and not cfg.packed_lp_first_caption_only
    assert ORIGINAL_SEMANTICS == {"mask_image_token_logit": False, "packed_lp_first_caption_only": True}
    gill_paper_config(**ORIGINAL_SEMANTICS).save_pretrained(tmp_path)
    again = GILLConfig.from_pretrained(tmp_path)
    assert (again.mask_image_token_logit, again.packed_lp_first_caption_only) == (False, True)
    with pytest.raises(StrictDataclassError, match="mask_image_token_logit"):
        GILLConfig(mask_image_token_logit="no")


def tokenizer_with_gill_tokens(extra: tuple[str, ...] = ()):
    tokenizer = build_tiny_tokenizer()  # 512 tokens
    tokenizer.add_tokens(list(extra))
    image_id, img_ids = add_gill_tokens(tokenizer, 8)
    return tokenizer, GILLConfig(img_token_ids=img_ids, image_token_id=image_id)


def test_check_token_ids():
    tokenizer, config = tokenizer_with_gill_tokens()
    assert (config.image_token_id, config.img_token_ids) == (512, list(range(513, 521)))  # <|image|> first
    check_token_ids(config, tokenizer, num_embeddings=512)  # GILL's 9 tokens right after the table: fine
    check_token_ids(config, tokenizer, num_embeddings=521)  # or inside a resized one
    with pytest.raises(ValueError, match=r"GILLConfig.img_token_ids are \[513, .*521\] but T gives \[IMG0..8\] "
                                         r"the ids \[513, .*520, None\] \(None: no such token\)"):
        check_token_ids(GILLConfig(num_img_tokens=9, img_token_ids=list(range(513, 522)), image_token_id=512),
                        tokenizer, source="T")
    with pytest.raises(ValueError, match=r"GILLConfig.image_token_id is 600 but the tokenizer gives <\|image\|> "
                                         r"the id 512"):
        check_token_ids(GILLConfig(img_token_ids=config.img_token_ids, image_token_id=600), tokenizer)
    with pytest.raises(ValueError, match=r"reach id 50273 but the LLM's input embeddings have 512 rows: .*ids < 521"):
        check_token_ids(gill_paper_config(), num_embeddings=512)
    with pytest.raises(ValueError, match=r"mask_image_token_logit=False keeps the LLM's own logit for <\|image\|> "
                                         r"\(id 512\) but the LLM's embeddings have 512 rows"):
        check_token_ids(GILLConfig(img_token_ids=config.img_token_ids, image_token_id=512,
                                   mask_image_token_logit=False), tokenizer, num_embeddings=512)
    extra, config = tokenizer_with_gill_tokens(("<extra>",))  # an ordinary token without an LLM row
    with pytest.raises(ValueError, match=r"the tokenizer has token '<extra>' with id 512 but the LLM's input "
                                         r"embeddings have 512 rows"):
        check_token_ids(config, extra, num_embeddings=512)
