import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from gill_hf import GILLForConditionalGeneration, RetrievalIndex
from gill_hf.cli import main
from gill_hf.demo import QuickstartSettings, run_quickstart
from gill_hf.toy_world import all_scenes, novel_prompts, scene_caption, shape_stories

LOSS_KEYS = {"loss", "caption_loss", "img_token_loss", "gen_loss", "ret_loss"}


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A shortened quickstart through the CLI: its exit code, folder, report and printed summary."""
    out = tmp_path_factory.mktemp("quickstart")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["quickstart", "--out", str(out), "--steps", "8", "--train-size", "32", "--eval-size", "8",
                     "--batch-size", "8", "--logging-steps", "2", "--diffusion-steps", "2", "--num-stories", "2"])
    return code, out, json.loads((out / "report.json").read_text()), printed.getvalue()


def held_out_recall(adapter_dir, index_dir, captions) -> float:
    """Recall@1 recomputed from the saved files alone: [IMG0] state -> W_t2i, brute-force cosine to the index."""
    model = GILLForConditionalGeneration.from_pretrained(adapter_dir).eval()
    index = RetrievalIndex.load(index_dir)
    enc = model.processor.encode_captions(captions, max_length=32)
    with torch.no_grad():
        _, states, _ = model.run_language_model(model.embed_tokens(enc["input_ids"]), enc["attention_mask"])
        rows, cols = model.img_block_positions(enc["input_ids"])
        queries = F.normalize(model.text_retrieval_embeddings(states[rows[:, 0], cols[:, 0]]), dim=-1)
    best = (queries @ index.embeddings.float().T).argmax(1)  # index rows follow the held-out captions
    return best.eq(torch.arange(len(captions))).float().mean().item()


def test_short_quickstart_writes_consistent_report_and_reloads_identically(short_run):
    code, out, report, printed = short_run
    assert code == 0
    assert report["reload"]["identical"] is True and all(report["reload"]["checks"].values())
    assert set(report["reload"]["checks"]) >= {"text", "generation_embeddings", "retrieval_scores"}
    history = report["loss_history"]
    assert [entry["step"] for entry in history] == [2, 4, 6, 8]  # steps / logging_steps entries
    assert all(LOSS_KEYS <= set(entry) for entry in history)
    adapter = out / "gill-adapter"
    assert (adapter / "model.safetensors").stat().st_size > 0
    card = (adapter / "README.md").read_text()
    assert "library_name: gill_hf" in card and "Recall@1" in card
    recall = f"{report['results']['retrieval']['recall_at_1']:.3f}"
    assert recall in card
    assert "retrieval Recall@1" in printed and f"chance {1 / 8:.3f}" in printed and recall in printed
    assert "reload identical: True" in printed and str(out / "report.html") in printed


def test_short_quickstart_numbers_match_recomputation(short_run):
    _, out, report, _ = short_run
    results = report["results"]
    captions = report["heldout_captions"]
    assert len(set(captions)) == 8 and results["retrieval"]["chance"] == 1 / 8
    recall = held_out_recall(out / "gill-adapter", out / "retrieval_index", captions)
    assert recall == pytest.approx(results["retrieval"]["recall_at_1"])
    decision = results["decision"]
    ret, gen = decision["counts"]["ret"], decision["counts"]["gen"]
    n = ret + gen
    assert ret == 8 and [e["label"] for e in decision["examples"]].count("gen") == gen
    assert decision["baselines"]["always_retrieve"] == pytest.approx(2 * ret / (n + ret) / 2)
    assert decision["baselines"]["always_generate"] == pytest.approx(2 * gen / (n + gen) / 2)
    pred = np.array([e["p_retrieve"] > decision["threshold"] for e in decision["examples"]])
    labels = np.array([e["label"] == "ret" for e in decision["examples"]])
    assert decision["accuracy"] == pytest.approx((pred == labels).mean(), abs=1 / n)  # p rounded in the report
    assert set(results["embedding_cosine"]) == {"matched", "mismatched_caption", "untrained_adapter"}
    scenes = [tuple(scene) for scene in report["heldout_scenes"]]
    assert [scene_caption(scene) for scene in scenes] == captions
    correct = results["image_correctness"]
    assert correct["random"] == {"colour": 1 / 6, "shape": 1 / 3, "position": 1 / 4, "scene": 1 / 72}
    for kind, readings in report["image_readings"].items():  # accuracies recounted from the probe's readings
        hits = [[r == s for r, s in zip(reading, scene)] for reading, scene in zip(readings, scenes)]
        assert correct[kind]["scene"] == pytest.approx(np.mean([all(h) for h in hits]))
        assert correct[kind]["colour"] == pytest.approx(np.mean([h[0] for h in hits]))


def test_short_quickstart_report_shows_answers_images_and_plot(short_run):
    _, out, report, _ = short_run
    answers = report["answers"]
    assert len(answers) == report["results"]["stories"]["steps"] == 2 * 3
    for answer in answers:
        image = [p for p in answer["parts"] if "kind" in p]
        assert len(image) == 1 and image[0]["decision"] in ("ret", "gen") and 0 <= image[0]["p_retrieve"] <= 1
        assert (image[0]["kind"] == "retrieved") == (image[0]["decision"] == "ret")
        if image[0]["kind"] == "retrieved":
            assert image[0]["path"] in report["heldout_paths"]
    with Image.open(out / "loss_curves.png") as plot:
        assert plot.format == "PNG" and plot.width > 300
    page = (out / "report.html").read_text()
    images_on_page = page.count("data:image/png;base64,")
    story_inputs = 0  # story prompts are text only
    grid = 6 * 3
    assert images_on_page >= 1 + grid + len(answers) + story_inputs  # plot, agreement grid, one image per answer
    assert "P(retrieve)=" in page and 'alt="loss curves"' in page and "Recall@1" in page
    assert "expect generate" in page and "expect retrieve" in page and "probe: " in page


def test_toy_stories_and_novel_prompts_stay_apart():
    scenes = all_scenes()
    assert len(scenes) == len(set(scenes)) == 72
    corpus = {scene_caption(s) for s in scenes}
    novel = novel_prompts(40, seed=3)
    assert len(set(novel)) == 40 and not corpus & set(novel)
    stories = shape_stories(scenes[:5], 3, length=3, seed=1)
    for story in stories:
        assert len({scene for _, _, scene in story}) == 3
        assert story[0][0] == scene_caption(story[0][2]) and story[1][0] == "then " + scene_caption(story[1][2])
    with pytest.raises(ValueError, match="at least 4 scenes"):
        shape_stories(scenes[:3], 1, length=4)
    with pytest.raises(ValueError, match="eval_size"):
        QuickstartSettings(eval_size=71)


def test_quickstart_learns_on_held_out_scenes(tmp_path):
    """A moderately longer run on the toy-world backbones, judged on 12 scenes never trained on: retrieval well above
    chance, the mapper near the right caption's embedding and far from a mismatched one's, GILL's generated images
    at the right place and showing whole scenes well above chance, and the decision above its baselines."""
    settings = QuickstartSettings(steps=300, train_size=256, eval_size=12, batch_size=16, logging_steps=40,
                                  num_stories=1, diffusion_steps=2, decision_steps=300)
    results = run_quickstart(tmp_path, settings)["results"]
    assert results["retrieval"]["recall_at_1"] >= 3 * results["retrieval"]["chance"]  # measured 0.50, chance 0.083
    cosine = results["embedding_cosine"]
    assert cosine["matched"] > cosine["mismatched_caption"] + 0.3 and cosine["matched"] > 0.6  # measured 0.82, 0.19
    correct = results["image_correctness"]
    assert correct["caption"]["position"] >= 0.9 and correct["caption"]["scene"] > 10 * correct["random"]["scene"]
    assert correct["gill"]["position"] >= 0.9  # measured 1.0
    assert correct["gill"]["scene"] > 5 * correct["random"]["scene"]  # measured 2/12 = 0.17, random 1/72
    assert results["decision"]["macro_f1"] > max(results["decision"]["baselines"].values())


def test_cli_passes_options_and_fails_when_the_reload_differs(monkeypatch, tmp_path):
    seen = {}

    def fake_run(out_dir, settings):
        seen.update(out_dir=out_dir, settings=settings)
        return {"reload": {"identical": False}}

    monkeypatch.setattr("gill_hf.demo.run_quickstart", fake_run)
    code = main(["quickstart", "--out", str(tmp_path), "--steps", "7", "--eval-size", "9", "--seed", "3"])
    assert code == 1 and seen["out_dir"] == str(tmp_path)
    assert (seen["settings"].steps, seen["settings"].eval_size, seen["settings"].seed) == (7, 9, 3)
    assert seen["settings"].batch_size == QuickstartSettings().batch_size


def test_readme_shows_the_printed_summary(short_run):
    """Each line of README's sample output starts with a label the quickstart really prints."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sample = re.search(r"^```text\n(.*?)^```", readme, re.S | re.M).group(1).splitlines()
    printed = [line.strip() for line in short_run[3].splitlines()]
    labels = [re.split(r"\s{2,}", line)[0] for line in sample]
    assert len(labels) == 4 and all(any(p.startswith(label) for p in printed) for label in labels), labels
