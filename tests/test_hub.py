"""push_to_hub -> from_pretrained through the real huggingface_hub client against a strict local fake Hub."""

import json
import time
from types import SimpleNamespace

import pytest
import safetensors.torch
import torch
from huggingface_hub import ModelCard

from gill_hf import GILLForConditionalGeneration, GILLProcessor
from gill_hf.configuration_gill import DEFAULT_DIFFUSION, DEFAULT_LLM, DEFAULT_VISION, gill_paper_config
from gill_hf.hub import HubPushError, build_model_card


@pytest.fixture(scope="module")
def trained_model(make_model):
    """A tiny GILL whose adapter differs from any fresh initialisation."""
    model = make_model("opt", seed=3)
    with torch.no_grad():
        for param in model.adapter.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def _adapter_snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}


def _outputs(model, batch):
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**batch, gill_objective=True, pack=False)
    return out.loss, out.text_embeds, out.image_embeds, out.gen_embeds


def test_push_then_load_gives_identical_outputs(fake_hub, trained_model, caption_batch):
    info = trained_model.push_to_hub("alice/gill-tiny", hyperparameters={"learning_rate": 0.001, "max_steps": 20},
                                     datasets=["cc3m"], eval_results=[{"task": "VIST", "CLIP similarity": 0.641}])
    assert info.oid == fake_hub.repos["alice/gill-tiny"].branches["main"]
    files = fake_hub.repos["alice/gill-tiny"].files()
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md"} <= set(files)
    stored = safetensors.torch.load(files["model.safetensors"])
    assert set(stored) == set(trained_model.adapter_state_dict())  # adapter only, decision head included
    assert "adapter.decision_head.1.weight" in stored

    loaded = GILLForConditionalGeneration.from_pretrained("alice/gill-tiny")
    assert loaded.processor is not None
    for key, value in trained_model.adapter_state_dict().items():
        assert torch.equal(loaded.adapter_state_dict()[key], value), key
    batch = caption_batch(trained_model, n=2)
    for ours, theirs in zip(_outputs(trained_model, batch), _outputs(loaded, batch), strict=True):
        assert torch.equal(ours, theirs)


def test_model_card_metadata_parses_back(fake_hub, trained_model):
    trained_model.push_to_hub("alice/gill-card", hyperparameters={"learning_rate": 0.001, "max_steps": 20},
                              datasets=["cc3m"], eval_results=[{"task": "VIST", "CLIP similarity": 0.641}],
                              license="apache-2.0")
    card = ModelCard.load("alice/gill-card")
    data = card.data.to_dict()
    assert data["library_name"] == "gill_hf"
    assert data["pipeline_tag"] == "any-to-any"
    assert data["base_model_relation"] == "adapter"
    assert "base_model" not in data  # the tiny backbones are local folders, not Hub ids
    assert data["license"] == "apache-2.0" and data["datasets"] == ["cc3m"]
    assert {"gill", "multimodal", "text-to-image"} <= set(data["tags"])
    assert 'GILLForConditionalGeneration.from_pretrained("alice/gill-card")' in card.text
    assert "| learning_rate | 0.001 |" in card.text and "| max_steps | 20 |" in card.text
    assert "| task | CLIP similarity |" in card.text and "| VIST | 0.641 |" in card.text
    n_params = sum(p.numel() for p in trained_model.adapter.parameters())
    assert f"{n_params:,} parameters" in card.text


def test_paper_card_lists_the_three_backbones():
    card = build_model_card(gill_paper_config(), "bob/gill-opt")
    data = card.data.to_dict()
    assert data["base_model"] == [DEFAULT_LLM, DEFAULT_VISION, DEFAULT_DIFFUSION]
    assert data["library_name"] == "gill_hf" and data["base_model_relation"] == "adapter"
    assert "Not recorded for this upload." in card.text and "No evaluation results" in card.text
    assert ModelCard(str(card)).data.to_dict() == data  # the YAML block round-trips
    assert "| generation conditioning (L x D) | 77 x 768 (stable_diffusion layout) |" in card.text
    sdxl = gill_paper_config()
    sdxl.diffusion_layout, sdxl.gen_emb_dim, sdxl.gen_pooled_dim = "sdxl", 2048, 1280
    assert "| 77 x 2048 + pooled 1280 (sdxl layout) |" in build_model_card(sdxl, "bob/gill-sdxl").text


def test_branch_revision_and_shards(fake_hub, trained_model, make_model):
    repo = "alice/gill-branch"
    trained_model.push_to_hub(repo)
    other = make_model("opt", seed=11)
    other.push_to_hub(repo, revision="experiment", max_shard_size=40_000)  # a few tens of kB per shard
    fake = fake_hub.repos[repo]
    assert fake.branches["main"] != fake.branches["experiment"]
    branch_files = fake.files("experiment")
    shards = [p for p in branch_files if p.startswith("model-") and p.endswith(".safetensors")]
    assert len(shards) >= 2 and "model.safetensors.index.json" in branch_files
    assert "model.safetensors" not in fake.files("experiment")  # main's single file was replaced
    assert 'revision="experiment"' in branch_files["README.md"].decode()

    from_branch = GILLForConditionalGeneration.from_pretrained(repo, revision="experiment")
    from_main = GILLForConditionalGeneration.from_pretrained(repo)
    for key, value in other.adapter_state_dict().items():
        assert torch.equal(from_branch.adapter_state_dict()[key], value), key
        assert torch.equal(from_main.adapter_state_dict()[key], trained_model.adapter_state_dict()[key]), key


def test_processor_and_retrieval_index_push(fake_hub, trained_model, tmp_path):
    index_dir = tmp_path / "index"
    index_dir.mkdir()
    embeddings = torch.randn(5, trained_model.config.ret_emb_dim)
    safetensors.torch.save_file({"embeddings": embeddings}, index_dir / "embeddings.safetensors")
    (index_dir / "paths.json").write_text(json.dumps([f"img{i}.jpg" for i in range(5)]))
    trained_model.push_to_hub("alice/gill-index", retrieval_index=index_dir)
    files = fake_hub.repos["alice/gill-index"].files()
    assert torch.equal(safetensors.torch.load(files["retrieval_index/embeddings.safetensors"])["embeddings"],
                       embeddings)
    assert "retrieval_index/" in files["README.md"].decode()

    trained_model.processor.push_to_hub("alice/gill-processor")
    files = fake_hub.repos["alice/gill-processor"].files()
    assert "processor_config.json" in files and "README.md" not in files  # no transformers default card
    processor = GILLProcessor.from_pretrained("alice/gill-processor")
    assert processor.img_token_ids == trained_model.processor.img_token_ids
    text = "a red circle on the left"
    assert processor([text])["input_ids"].tolist() == trained_model.processor([text])["input_ids"].tolist()


@pytest.fixture
def no_backoff_sleep(monkeypatch):
    """huggingface_hub retries 5xx answers with 1-8 s pauses; skip the pauses (only in its http module)."""
    from huggingface_hub.utils import _http

    monkeypatch.setattr(_http, "time", SimpleNamespace(**{**vars(time), "sleep": lambda seconds: None}))


@pytest.mark.parametrize(("path", "status", "times", "expected"), [
    (r"/commit/", 500, 100, "HTTP 500"),  # the Hub keeps failing: the client's retries give up
    (r"/preupload/", 401, 1, "has write access"),  # token refused after the repo call succeeded
])
def test_server_fault_mid_upload_is_clear_and_harmless(fake_hub, trained_model, caption_batch, no_backoff_sleep,
                                                       path, status, times, expected):
    repo = f"alice/gill-fault-{status}"
    trained_model.push_to_hub(repo)
    before_commit = fake_hub.repos[repo].branches["main"]
    before_weights = _adapter_snapshot(trained_model)
    batch = caption_batch(trained_model, n=2)
    before_outputs = _outputs(trained_model, batch)

    fake_hub.inject_fault("POST", path, status, message="backend exploded", times=times)
    with pytest.raises(HubPushError, match=expected) as info:
        trained_model.push_to_hub(repo, commit_message="second upload")
    fake_hub.faults.clear()
    assert repo in str(info.value) and "backend exploded" in str(info.value)
    assert fake_hub.repos[repo].branches["main"] == before_commit  # nothing committed
    for key, value in trained_model.adapter_state_dict().items():
        assert torch.equal(value, before_weights[key]), key
    for before, after in zip(before_outputs, _outputs(trained_model, batch), strict=True):
        assert torch.equal(before, after)


def test_transient_server_error_is_retried(fake_hub, trained_model, no_backoff_sleep):
    repo = "alice/gill-transient"
    trained_model.push_to_hub(repo)
    before_commit = fake_hub.repos[repo].branches["main"]
    fake_hub.inject_fault("POST", r"/commit/", 503, times=1)
    trained_model.push_to_hub(repo, hyperparameters={"seed": 7})
    assert fake_hub.repos[repo].branches["main"] != before_commit
    assert "| seed | 7 |" in fake_hub.repos[repo].files()["README.md"].decode()


def test_fake_hub_refuses_unknown_endpoints_and_bad_tokens(fake_hub):
    import httpx2

    response = httpx2.get(f"{fake_hub.endpoint}/api/spaces/alice/demo")
    assert response.status_code == 501 and "unsupported endpoint" in response.json()["error"]
    assert fake_hub.unknown_requests.pop() == ("GET", "/api/spaces/alice/demo")
    response = httpx2.post(f"{fake_hub.endpoint}/api/repos/create", json={"name": "x", "organization": "alice"},
                           headers={"Authorization": "Bearer wrong"})
    assert response.status_code == 401


def test_lora_adapter_round_trip(fake_hub, make_model, caption_batch):
    from peft import PeftModel

    from gill_hf.training import apply_lora

    model = apply_lora(make_model("opt", seed=5)).eval()
    with torch.no_grad():  # LoRA B starts at zero; make the adapter change the LLM
        for name, param in model.language_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    model.push_to_hub("alice/gill-lora")
    files = fake_hub.repos["alice/gill-lora"].files()
    assert {"lora/adapter_config.json", "lora/adapter_model.safetensors"} <= set(files)
    assert "| LoRA on the LLM |" in files["README.md"].decode()

    loaded = GILLForConditionalGeneration.from_pretrained("alice/gill-lora")
    assert isinstance(loaded.language_model, PeftModel) and loaded.config.use_lora
    batch = caption_batch(model, n=2)
    for ours, theirs in zip(_outputs(model, batch), _outputs(loaded, batch), strict=True):
        assert torch.equal(ours, theirs)


def test_pipeline_push_and_load(fake_hub, trained_model, tiny_backbones):
    from gill_hf import GILLPipeline, RetrievalIndex

    index = RetrievalIndex(torch.randn(4, trained_model.config.ret_emb_dim), [f"{i}.png" for i in range(4)], 2.0)
    pipe = GILLPipeline.from_gill(trained_model, retrieval_index=index)
    pipe.push_to_hub("alice/gill-pipeline", datasets=["cc3m"])
    files = fake_hub.repos["alice/gill-pipeline"].files()
    assert {"model_index.json", "gill_model/model.safetensors", "retrieval_index/paths.json"} <= set(files)
    readme = files["README.md"].decode()
    assert 'GILLPipeline.from_pretrained("alice/gill-pipeline")' in readme and "library_name: gill_hf" in readme

    loaded = GILLPipeline.from_pretrained("alice/gill-pipeline")
    for key, value in trained_model.adapter_state_dict().items():
        assert torch.equal(loaded.gill_model.adapter_state_dict()[key], value), key
    for (name, ours), theirs in zip(pipe.unet.state_dict().items(), loaded.unet.state_dict().values(), strict=True):
        assert torch.equal(ours, theirs), name
    assert loaded.retrieval_index.paths == index.paths
    assert torch.equal(loaded.retrieval_index.embeddings, index.embeddings)


def test_card_template_is_the_packaged_top_level_file():
    from pathlib import Path

    from gill_hf.hub import MODEL_CARD_TEMPLATE

    top_level = Path(__file__).resolve().parents[1] / "MODEL_CARD.md"
    assert MODEL_CARD_TEMPLATE.parent.name == "gill_hf"  # inside the package, so wheels carry it
    assert MODEL_CARD_TEMPLATE.read_text() == top_level.read_text()


def test_save_pretrained_push_to_hub_goes_through_gill_push(fake_hub, trained_model, tmp_path):
    trained_model.save_pretrained(tmp_path / "gill-saved", push_to_hub=True, repo_id="alice/gill-saved",
                                  commit_message="from save_pretrained")
    assert (tmp_path / "gill-saved" / "model.safetensors").is_file()  # the local save still happens
    files = fake_hub.repos["alice/gill-saved"].files()
    assert {"config.json", "model.safetensors", "processor_config.json", "tokenizer.json", "README.md"} <= set(files)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "gill_hf" and card.data.base_model_relation == "adapter"
    with pytest.raises(TypeError, match="only apply with push_to_hub=True"):
        trained_model.save_pretrained(tmp_path / "x", repo_id="alice/x")


def test_trainer_push_to_hub_uploads_the_gill_card(fake_hub, make_model, tmp_path):
    from gill_hf.training import CaptionImageDataset, train_gill
    from gill_hf.toy_world import write_toy_cc3m

    ds = CaptionImageDataset.from_tsv(write_toy_cc3m(tmp_path / "data", 4))
    trainer = train_gill(make_model(), ds, str(tmp_path / "run"), max_steps=1, learning_rate=3e-4,
                         hub_model_id="alice/gill-trained", disable_tqdm=True, use_cpu=True,
                         per_device_train_batch_size=4)
    trainer.train()
    trainer.push_to_hub(dataset="cc3m")
    files = fake_hub.repos["alice/gill-trained"].files()
    assert {"config.json", "model.safetensors", "processor_config.json", "README.md"} <= set(files)
    stored = safetensors.torch.load(files["model.safetensors"])
    assert stored and all(k.startswith("adapter.") for k in stored)
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "gill_hf" and card.data.datasets == ["cc3m"]
    assert "learning_rate" in card.text and "0.0003" in card.text  # the TrainingArguments as hyperparameters
    with pytest.raises(TypeError, match="'finetuned_form'"):
        trainer.push_to_hub(finetuned_form="x")
    with pytest.raises(TypeError, match="'model_name'"):  # the stock card's title: gill_hf's card has none
        trainer.push_to_hub(model_name="x")
    with pytest.raises(ValueError, match="blocking=False"):
        trainer.push_to_hub(blocking=False)
