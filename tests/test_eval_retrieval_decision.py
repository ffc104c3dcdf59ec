"""gill-hf eval retrieval (Recall@k = brute-force ranking of the cosine matrix) and eval decision (Table 6 baselines
on the real PartiPrompts annotations equal the closed form from the label counts)."""

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from eval_fixtures import write_vist

from gill_hf.cli import main
from gill_hf.evaluation import load_vist, vist_context
from gill_hf.evaluation.retrieval import query_embeddings
from gill_hf.retrieval import RetrievalIndex

pytestmark = pytest.mark.usefixtures("single_thread")
RELEASE = "/work/shared/data/gill-release"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, make_model):
    path = str(tmp_path_factory.mktemp("gill"))
    model = make_model()
    model.save_pretrained(path)
    return model, path


def test_retrieval_recall_equals_brute_force(saved_model, tmp_path):
    model, path = saved_model
    annotations, image_dir = write_vist(tmp_path, num_stories=4)
    out = str(tmp_path / "out")
    assert main(["eval", "retrieval", path, "--out", out, "--annotations", annotations, "--image-dir", image_dir,
                 "--batch-size", "3"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    assert results["num_candidates"] == 4 and len(results["rows"]) == 3
    examples = load_vist(annotations, image_dir)
    index = RetrievalIndex.load(os.path.join(out, "index"))
    with torch.no_grad():  # the candidates are W_i2t CLIP(last image) of every story
        candidates = model.image_retrieval_embeddings(model.encode_images(
            model.processor.preprocess_images([ex.target for ex in examples])))
    torch.testing.assert_close(index.embeddings.float(), F.normalize(candidates, dim=-1), atol=1e-5, rtol=1e-4)
    queries = safetensors.torch.load_file(os.path.join(out, "queries.safetensors"))
    # batching does not change a query: recompute the richest setting one context at a time
    single = query_embeddings(model, [vist_context(ex, "5 captions, 4 images") for ex in examples], batch_size=1)
    torch.testing.assert_close(queries["5_captions_4_images"], single, atol=1e-4, rtol=1e-4)
    for row in results["rows"]:
        q = F.normalize(queries[row["setting"].replace(", ", "_").replace(" ", "_")], dim=-1)
        cosine = q @ F.normalize(candidates, dim=-1).T  # (Q, N)
        rank = (cosine.argsort(dim=1, descending=True) == torch.arange(4)[:, None]).float().argmax(dim=1)
        for k in (1, 5, 10):
            assert row[f"R@{k}"] == pytest.approx(100 * (rank < k).float().mean().item())
    assert results["rows"][-1]["R@5"] == 100.0  # 4 candidates: always in the top 5
    assert "| GILL | 5 captions, 4 images |" in Path(os.path.join(out, "results.md")).read_text()


def test_decision_baselines_on_real_annotations(saved_model, tmp_path):
    _, path = saved_model
    confident = os.path.join(RELEASE, "PartiPromptsDecisionsConfident.tsv")
    alignment = os.path.join(RELEASE, "PartiPromptsAllDecisions_Alignment.tsv")
    out = str(tmp_path / "out")
    assert main(["eval", "decision", path, "--out", out, "--annotations", confident, alignment]) == 0
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    first = results["files"][0]
    gen, ret = first["val_counts"]["gen"], first["val_counts"]["ret"]
    assert (gen, ret) == (201, 110)  # the paper's validation split
    f1_gen = 2 * gen / (2 * gen + ret)
    f1_ret = 2 * ret / (2 * ret + gen)
    assert first["baselines"]["always_generate"] == pytest.approx(f1_gen / 2)
    assert first["baselines"]["always_retrieve"] == pytest.approx(f1_ret / 2)
    assert first["num_val"] == gen + ret
    classifier = first["classifier"]
    assert 0.0 <= classifier["min"] <= classifier["f1_at_threshold"] <= classifier["max"] <= 1.0
    assert results["files"][1]["file"] == "PartiPromptsAllDecisions_Alignment.tsv"
    table = Path(os.path.join(out, "results.md")).read_text()
    assert f"| Always generate | {f1_gen / 2:.3f} |" in table and "Linear classifier" in table
