"""gill-hf eval vist / visdial / fid end to end on official-format toy files with tiny backbones: the reported
metrics equal a direct computation on the saved images, and a rerun reuses every image."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from eval_fixtures import (
    ChannelMeans,
    stub_alexnet_weights,
    write_coco_captions,
    write_visdial,
    write_vist,
)
from PIL import Image
from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
from transformers import CLIPImageProcessor, CLIPVisionModel

from gill_hf.cli import main
from gill_hf.evaluation import load_visdial, load_vist, visdial_context, vist_context
from gill_hf.evaluation.metrics import uint8_pixels

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory, make_model, tiny_backbones):
    root = tmp_path_factory.mktemp("eval")
    model_dir = str(root / "gill")
    make_model().save_pretrained(model_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCH_HOME", str(root / "torch_home"))
        stub_alexnet_weights(str(root / "torch_home"))
        yield {"root": root, "model": model_dir, "clip": tiny_backbones["clip"]}


def _results(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _direct_similarity(clip_path: str, generated: list[str], targets: list[str]) -> tuple[float, float]:
    """Mean CLIP cosine (pooled output of the plain CLIPVisionModel) and mean LPIPS, computed from scratch."""
    model, proc = CLIPVisionModel.from_pretrained(clip_path).eval(), CLIPImageProcessor.from_pretrained(clip_path)

    def embed(paths):
        with torch.no_grad():
            return model(**proc(images=[Image.open(p).convert("RGB") for p in paths], return_tensors="pt")).pooler_output

    a, b = embed(generated), embed(targets)
    cosine = (a @ b.T).diagonal() / (a.norm(dim=1) * b.norm(dim=1))
    lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)

    def pixels(paths):
        arrays = [np.asarray(Image.open(p).convert("RGB").resize((256, 256), Image.BICUBIC)) for p in paths]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0

    return cosine.mean().item(), lpips(pixels(generated), pixels(targets)).item()


def _mtimes(out) -> dict:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, files in os.walk(out) for f in files
            if f.endswith(".png") and "images" in d}


def test_vist_end_to_end_matches_direct_metrics_and_resumes(env):
    annotations, image_dir = write_vist(env["root"], num_stories=4)
    out = str(env["root"] / "vist_out")
    argv = ["eval", "vist", env["model"], "--out", out, "--annotations", annotations, "--image-dir", image_dir,
            "--limit", "3", "--seeds", "0", "1", "--steps", "1", "--clip-model", env["clip"]]
    assert main(argv) == 0
    results = _results(out)
    assert results["num_examples"] == 3 and results["images"] == {"generated": 30, "reused": 0}
    assert [(r["model"], r["setting"]) for r in results["rows"]] == [
        ("Stable Diffusion", "1 caption"), ("Stable Diffusion", "5 captions"), ("GILL", "1 caption"),
        ("GILL", "5 captions"), ("GILL", "5 captions, 4 images")]
    examples = load_vist(annotations, image_dir, limit=3)
    targets = [ex.target for ex in examples]
    assert [os.path.basename(t) for t in targets] == ["5004.png", "5009.png", "5014.png"]  # last step of each story
    for row in results["rows"]:
        key = ("gill" if row["model"] == "GILL" else "sd") + "-" + row["setting"].replace(", ", "_").replace(" ", "_")
        clip_per_seed, lpips_per_seed = [], []
        for seed in (0, 1):
            generated = [os.path.join(out, "images", key, str(seed), f"{ex.example_id}.png") for ex in examples]
            clip, lpips = _direct_similarity(env["clip"], generated, targets)
            clip_per_seed.append(clip)
            lpips_per_seed.append(lpips)
        np.testing.assert_allclose(row["clip_similarity"]["values"], clip_per_seed, rtol=1e-4)
        np.testing.assert_allclose(row["lpips"]["values"], lpips_per_seed, rtol=1e-4)
        assert row["clip_similarity"]["std"] == pytest.approx(np.std(clip_per_seed, ddof=1), rel=1e-4)
    table = Path(os.path.join(out, "results.md")).read_text()
    assert "| Stable Diffusion |" in table and " ± " in table and "CLIP Similarity ↑ (5 captions, 4 images)" in table
    assert table.count(" - |") == 2  # Stable Diffusion has no multimodal setting
    html = Path(os.path.join(out, "samples.html")).read_text()
    assert html.count("<img") == 3 * (4 + 1 + 5)  # per example: 4 context images, the ground truth, 5 rows

    before = _mtimes(out)
    assert main(argv) == 0
    again = _results(out)
    assert again["images"] == {"generated": 0, "reused": 30}
    assert _mtimes(out) == before
    assert again["rows"] == results["rows"]


def test_vist_contexts_follow_table_1():
    class Ex:
        texts, context_images = [f"t{i}" for i in range(5)], []

    assert vist_context(Ex, "1 caption") == ["t4"]
    assert vist_context(Ex, "5 captions") == ["t0 t1 t2 t3 t4"]


def test_visdial_curve_end_to_end(env):
    annotations, image_dir = write_visdial(env["root"])
    out = str(env["root"] / "visdial_out")
    assert main(["eval", "visdial", env["model"], "--out", out, "--annotations", annotations, "--image-dir",
                 image_dir, "--curve", "--seeds", "0", "--steps", "1", "--clip-model", env["clip"]]) == 0
    results = _results(out)
    assert results["rounds"] == list(range(1, 11))
    assert len(results["rows"]) == 20 and results["images"]["generated"] == 60
    with Image.open(os.path.join(out, "context_curve.png")) as plot:
        assert plot.format == "PNG" and plot.width > 100
    examples = load_visdial(annotations, image_dir)
    assert [os.path.basename(ex.target) for ex in examples] == [
        "VisualDialog_val2018_000000000120.jpg", "VisualDialog_val2018_000000000121.jpg", "122.png"]
    assert visdial_context(examples[0], 1) == ["Q: what colour is it?\nA: red"]
    assert visdial_context(examples[0], 10)[0].count("\n") == 19
    row = next(r for r in results["rows"] if r["model"] == "GILL" and r["setting"] == "10 rounds")
    generated = [os.path.join(out, "images", "gill-10_rounds", "0", f"{ex.example_id}.png") for ex in examples]
    clip, lpips = _direct_similarity(env["clip"], generated, [ex.target for ex in examples])
    assert row["clip_similarity"]["mean"] == pytest.approx(clip, rel=1e-4)
    assert row["lpips"]["mean"] == pytest.approx(lpips, rel=1e-4)
    assert "| GILL |" in Path(os.path.join(out, "results.md")).read_text()


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root))


def test_fid_end_to_end_matches_scipy(env):
    captions = write_coco_captions(env["root"], num_images=6)
    feature = str(env["root"] / "channel_means.pt2")
    example = torch.zeros(2, 3, 299, 299, dtype=torch.uint8)
    torch.export.save(torch.export.export(ChannelMeans(), (example,), dynamic_shapes=({0: torch.export.Dim("n")},)),
                      feature)
    out = str(env["root"] / "fid_out")
    assert main(["eval", "fid", env["model"], "--out", out, "--captions", captions, "--fid-feature", feature,
                 "--seeds", "0", "1", "--steps", "2"]) == 0
    results = _results(out)
    assert results["images"]["generated"] == 24 and results["diffusion"]["scheduler"] == "ddim"
    references = sorted(os.path.join(os.path.dirname(captions), f) for f in os.listdir(os.path.dirname(captions))
                        if f.endswith(".jpg"))
    real = ChannelMeans()(uint8_pixels(references)).double().numpy()
    for row in results["rows"]:
        key = "gill-captions" if row["model"] == "GILL" else "sd-captions"
        expected = []
        for seed in (0, 1):
            folder = os.path.join(out, "images", key, str(seed))
            fake = ChannelMeans()(uint8_pixels([os.path.join(folder, f"{900 + i}.png") for i in range(6)]))
            expected.append(_frechet(real, fake.double().numpy()))
        np.testing.assert_allclose(row["fid"]["values"], expected, rtol=1e-3, atol=1e-6)
    assert "FID ↓ (captions)" in Path(os.path.join(out, "results.md")).read_text()


def test_bad_inputs_are_named(env, tmp_path):
    annotations, image_dir = write_vist(tmp_path, num_stories=2)
    os.remove(os.path.join(image_dir, "5006.jpg"))
    with pytest.raises(FileNotFoundError, match="5006"):
        load_vist(annotations, image_dir)
    short, short_dir = write_vist(tmp_path / "short", num_stories=1, steps=4)
    with pytest.raises(ValueError, match="story 0 has 4 steps"):
        load_vist(short, short_dir)
    with pytest.raises(ValueError, match="unknown VIST setting"):
        vist_context(load_vist(annotations, image_dir, limit=1)[0], "2 captions")
    assert main(["eval", "vist", env["model"], "--out", str(tmp_path), "--annotations", annotations, "--image-dir",
                 image_dir, "--settings", "2cap"]) == 2  # argparse's usage error
    no_data = tmp_path / "visdial.json"
    no_data.write_text(json.dumps({"dialogs": []}))
    with pytest.raises(ValueError, match="'data'"):
        load_visdial(no_data, tmp_path)
    dialogs, dialog_dir = write_visdial(tmp_path / "vd", num_dialogs=1)
    os.remove(os.path.join(dialog_dir, "VisualDialog_val2018_000000000120.jpg"))
    with pytest.raises(FileNotFoundError, match="120"):
        load_visdial(dialogs, dialog_dir)


def test_clip_embedder_uses_projected_features_of_a_full_clip(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    from gill_hf.evaluation import ClipImageEmbedder
    from gill_hf.tiny import tiny_clip_vision_config, tiny_image_processor

    torch.manual_seed(0)
    config = CLIPConfig(text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                                     "num_attention_heads": 4}, vision_config=tiny_clip_vision_config().to_dict(),
                        projection_dim=16)
    clip = CLIPModel(config).eval()
    clip.save_pretrained(tmp_path)
    tiny_image_processor().save_pretrained(tmp_path)
    embedder = ClipImageEmbedder(str(tmp_path))
    image = Image.new("RGB", (40, 30), "red")
    pixels = embedder.image_processor(images=[image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    torch.testing.assert_close(embedder.embed([image]), expected)


def test_fid_caption_sample_is_seeded_and_checked(tmp_path):
    from gill_hf.evaluation import load_caption_set

    captions = write_coco_captions(str(tmp_path), num_images=6)
    everything = [ex.example_id for ex in load_caption_set(captions)]
    drawn = [ex.example_id for ex in load_caption_set(captions, sample=4, sample_seed=1)]
    assert drawn == [ex.example_id for ex in load_caption_set(captions, sample=4, sample_seed=1)]
    assert len(set(drawn)) == 4 and set(drawn) < set(everything)
    assert drawn != [ex.example_id for ex in load_caption_set(captions, sample=4, sample_seed=2)]
    with pytest.raises(ValueError, match="--sample must be in 1..6"):
        load_caption_set(captions, sample=7)
