"""MiniGPT-5's benchmarks: each metric against a direct computation on hand-made examples, and gill-hf eval
minigpt5-vist / cc3m / mmdialog end to end on official-format toy files (rerun and resume after an interruption)."""

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from minigpt5_fixtures import (
    MMDIALOG_TURNS,
    ChannelMeans,
    ColourLogits,
    StandInWordNet,
    as_context_image,
    build_tiny_sbert,
    export_module,
    minigpt5_training_prompt,
    part_values,
    register_tiny_open_clip,
    write_cc3m,
    write_mmdialog,
)
from nltk.tokenize import wordpunct_tokenize
from nltk.translate.meteor_score import meteor_score
from PIL import Image

from gill_hf.evaluation import text_metrics
from gill_hf.evaluation.image_cache import SETTINGS_NAME
from gill_hf.evaluation.image_quality import InceptionScorer, reference_statistics
from gill_hf.evaluation.metrics import FIDScorer, uint8_pixels
from gill_hf.evaluation.mm_relevance import EXTRA, MISSING, clip_f1, modality_entry

pytestmark = pytest.mark.usefixtures("single_thread")
REAL_LOAD_WORDNET = text_metrics.load_wordnet  # the module's env fixture replaces it with a stand-in


# ---------------------------------------------------------------------------------------------- metrics by hand
def test_bleu_and_rouge_l_by_hand():
    predictions = ["the cat sat on the mat", "the cat", "a red circle"]
    references = ["the cat is on the mat", "the cat sat", "a big red circle here"]
    # 1: unigrams 5/6, bigrams 3/5 (the cat, on the, the mat), same length; 2: all match, brevity exp(1 - 3/2);
    # 3: unigrams 3/3, bigrams 1/2 (red circle), brevity exp(1 - 5/3)
    bp2, bp3 = math.exp(1 - 3 / 2), math.exp(1 - 5 / 3)
    np.testing.assert_allclose(text_metrics.bleu(predictions, references, 1), [5 / 6, bp2, bp3], rtol=1e-6)
    np.testing.assert_allclose(text_metrics.bleu(predictions, references, 2),
                               [math.sqrt(5 / 6 * 3 / 5), bp2, bp3 * math.sqrt(1 / 2)], rtol=1e-6)
    # LCS: "the cat on the mat" (5 of 6 / 6), "the cat" (2 of 2 / 3), "a red circle" (3 of 3 / 5)
    f1 = [5 / 6, 2 * 1 * (2 / 3) / (1 + 2 / 3), 2 * 1 * (3 / 5) / (1 + 3 / 5)]
    np.testing.assert_allclose(text_metrics.rouge_l(predictions, references), f1, rtol=1e-6)
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        text_metrics.bleu(["a", "b"], ["a"], 1)


def test_meteor_equals_nltk_and_uses_the_given_wordnet():
    wordnet = StandInWordNet()
    predictions, references = ["The hound sat on the mat .", "a dog"], ["the dog sat on a mat", "the park"]
    direct = [meteor_score([wordpunct_tokenize(r.lower())], wordpunct_tokenize(p.lower()), wordnet=wordnet)
              for p, r in zip(predictions, references)]
    got = text_metrics.meteor(predictions, references, wordnet=wordnet)
    assert got == direct
    no_synonyms = text_metrics.meteor(predictions, references, wordnet=type("NoSynonyms", (), {
        "synsets": staticmethod(lambda word, *a, **k: [])})())
    assert got[0] > no_synonyms[0] and got[1] == no_synonyms[1] == 0.0  # "hound" ~ "dog" matched; no match


def test_missing_wordnet_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setenv("NLTK_DATA", str(tmp_path))
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    with pytest.raises(LookupError, match="nltk.downloader wordnet"):
        text_metrics.load_wordnet()


@pytest.fixture(scope="module")
def sbert_path(tmp_path_factory):
    return build_tiny_sbert(str(tmp_path_factory.mktemp("sbert")))


def test_sbert_is_the_cosine_of_the_sentence_embeddings(sbert_path):
    from sentence_transformers import SentenceTransformer

    predictions, references = ["we saw a dog", "the red circle", "big star"], ["a dog at the park", "red", "big star"]
    scorer = text_metrics.SentenceSimilarity(sbert_path)
    model = SentenceTransformer(sbert_path, device="cpu")
    a, b = model.encode(predictions), model.encode(references)
    direct = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(scorer.scores(predictions, references), direct, rtol=1e-5)
    assert scorer.scores(predictions, references)[2] == pytest.approx(1.0)


def test_mm_relevance_by_hand_with_missing_and_extra_modalities():
    entries = [modality_entry(True, True, 0.8), modality_entry(True, False),  # turn 1: image missing (-1)
               modality_entry(True, True, 0.6), modality_entry(False, True),  # turn 2: extra image (-2)
               modality_entry(True, True, 0.5), modality_entry(True, True, 0.9),  # turn 3: both modalities
               modality_entry(True, False), modality_entry(False, False)]  # turn 4: text missing, no image at all
    assert entries[1] == ("marker", MISSING) and entries[3] == ("marker", EXTRA) and entries[7] is None
    total = 0.8 + 0.6 + 0.5 + 0.9
    precision, recall = total / 5, total / 6  # predicted: 3 texts + 2 images; ground truth: 4 texts + 2 images
    assert clip_f1(entries) == pytest.approx(2 * precision * recall / (precision + recall))
    assert clip_f1([modality_entry(True, False)]) == 0.0  # nothing predicted
    assert clip_f1([modality_entry(True, True, 0.7)]) == pytest.approx(0.7)
    with pytest.raises(ValueError, match="needs its CLIP cosine"):
        modality_entry(True, True)


def _images(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)) for _ in range(n)]


def _inception_score(logits: np.ndarray) -> float:
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    marginal = p.mean(0, keepdims=True)
    return float(np.exp((p * (np.log(p) - np.log(marginal))).sum(1).mean()))


def test_inception_score_equals_the_formula():
    images = _images(6, seed=1)
    logits = ColourLogits()(uint8_pixels(images)).double().numpy()
    torch.manual_seed(3)
    order = torch.randperm(6).numpy()  # torchmetrics' shuffle into splits under the scorer's seed
    expected = np.mean([_inception_score(logits[order[:3]]), _inception_score(logits[order[3:]])])
    scorer = InceptionScorer(ColourLogits(), splits=2, seed=3)
    assert scorer.score([images[:4], images[4:]]) == pytest.approx(expected, rel=1e-5)
    assert scorer.score([images]) == pytest.approx(expected, rel=1e-5)  # reproducible
    with pytest.raises(ValueError, match="needs at least 10 images, got 6"):
        InceptionScorer(ColourLogits()).score([images])


def _frechet(a: np.ndarray, b: np.ndarray) -> float:
    root = scipy.linalg.sqrtm(np.cov(a, rowvar=False) @ np.cov(b, rowvar=False)).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum()
                 + np.trace(np.cov(a, rowvar=False) + np.cov(b, rowvar=False) - 2 * root))


def test_fid_reference_statistics_are_cached_by_image_set_and_feature(tmp_path):
    paths = []
    for i, image in enumerate(_images(5, seed=2)):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    generated = _images(4, seed=3)
    scorer, cache = FIDScorer(ChannelMeans()), str(tmp_path / "cache")
    first = reference_statistics(scorer, paths, "channel-means", cache)
    expected = _frechet(ChannelMeans()(uint8_pixels(paths)).double().numpy(),
                        ChannelMeans()(uint8_pixels(generated)).double().numpy())
    assert not first["reused"] and scorer.score([generated]) == pytest.approx(expected, rel=1e-4)
    again = FIDScorer(ChannelMeans())
    second = reference_statistics(again, paths, "channel-means", cache)
    assert second == {"file": first["file"], "reused": True} and again.num_reference == 5
    assert again.score([generated]) == pytest.approx(expected, rel=1e-4)
    assert not reference_statistics(again, paths, "other-feature", cache)["reused"]  # feature in the key
    assert not reference_statistics(again, paths[:4], "channel-means", cache)["reused"]  # image set in the key
    assert again.num_reference == 4  # the previous set was cleared first
    assert len(os.listdir(cache)) == 3


# ---------------------------------------------------------------------------------------------- prompts
def _flat(parts: list) -> str:
    """Parts -> the text with ``<|image|>`` per image."""
    from gill_hf.chat_templates import IMAGE_TOKEN

    return "".join(part if isinstance(part, str) else IMAGE_TOKEN for part in parts)


def test_minigpt5_vist_prompts_are_what_stage2_training_builds(tmp_path):
    from eval_fixtures import write_vist

    from gill_hf import GILLProcessor
    from gill_hf.chat_templates import MINIGPT5_VIST_SYSTEM_PROMPT as SYSTEM
    from gill_hf.evaluation import load_vist
    from gill_hf.evaluation.contexts import context_image
    from gill_hf.evaluation.minigpt5_vist import minigpt5_narration_prompt, minigpt5_step_prompt, story_steps
    from gill_hf.tiny import build_tiny_tokenizer, tiny_image_processor
    from gill_hf.training import InterleavedDataCollator, VISTTaskDataset

    annotations, image_dir = write_vist(tmp_path, num_stories=2)
    processor = GILLProcessor(tiny_image_processor(), build_tiny_tokenizer())
    collator = InterleavedDataCollator(processor, max_length=4096, prompt_format="minigpt5")
    steps = [step for example in load_vist(annotations, image_dir) for step in story_steps(example)]
    training = VISTTaskDataset.from_json(annotations, image_dir)
    items = {key: training[i] for i, key in enumerate(training.examples)}  # (story, step, task) -> item
    checked = 0
    for (s, j, task), item in items.items():
        if task == "text_image":  # MiniGPT-5's text + image task has no evaluation here
            continue
        step = steps[5 * s + j]
        parts = minigpt5_step_prompt(step, "image-text context") if task == "gen" else minigpt5_narration_prompt(step)
        text, images, ids = minigpt5_training_prompt(item, collator)
        assert _flat(parts) == text, (s, j, task)
        assert part_values([p for p in parts if not isinstance(p, str)]) == part_values(
            [as_context_image(image) for image in images])  # the same images in placeholder order
        assert processor(parts, return_tensors=None)["input_ids"][0] == ids  # the ids the model is fed
        checked += 1
    assert checked == 2 * (5 + 4)  # every step's image, every later step's narration
    final = steps[4]
    image = "<Img><|image|></Img>"
    instruction = " Generate an image with the scene description: "
    # the other final-step prompt types: no history, images without captions, the five texts as the description
    assert _flat(minigpt5_step_prompt(final, "no context")) == \
        f"{SYSTEM}###Human:{instruction}{final.texts[-1]} ###Assistant:"
    image_only = minigpt5_step_prompt(final, "image context")
    assert _flat(image_only) == f"{SYSTEM}###Human:{image * 4}\n{instruction}{final.texts[-1]} ###Assistant:"
    assert part_values([p for p in image_only if not isinstance(p, str)]) == part_values(
        [context_image(path) for path in final.context_images])
    assert minigpt5_step_prompt(final, "text context") == [
        f"{SYSTEM}###Human:{instruction}{' '.join(final.texts)} ###Assistant:"]
    with pytest.raises(ValueError, match="unknown VIST prompt type 'story'"):
        minigpt5_step_prompt(final, "story")


def test_answers_end_before_minigpt5s_stop_string(make_model):
    from gill_hf.chat_templates import MINIGPT5_STOP
    from gill_hf.evaluation import DiffusionSettings, EvaluatedModels

    models = EvaluatedModels(make_model(), DiffusionSettings(num_inference_steps=1))
    tok = models.model.processor.tokenizer
    said = tok("dog ###", add_special_tokens=False)["input_ids"]  # what MiniGPT-5 writes: "{text} ###"
    # growing biases on each prefix make the tiny LLM say "dog ###" over and over
    models.model.generation_config.sequence_bias = [[said[:n], 100.0 * n] for n in range(1, len(said) + 1)]
    outputs, pipe = [], models.pipe
    models.pipe = lambda *args, **kwargs: outputs.append(pipe(*args, **kwargs)) or outputs[-1]
    prompt = ["###Human: a red circle <Img>", Image.new("RGB", (30, 30), "red"), "</Img> ###Assistant:"]
    assert models.gill_text(prompt, 2 * len(said)) == "dog ###dog ###"  # without a stop it runs on
    assert models.gill_text(prompt, 2 * len(said), stop=MINIGPT5_STOP) == "dog"
    generation = outputs[-1].generation
    assert generation.sequences[0, generation.prompt_length:].tolist() == said  # it stopped at the stop string
    text, image = models.gill_response(prompt, 0, 2 * len(said), stop=MINIGPT5_STOP)
    assert (text, image) == ("dog", None)
    with pytest.raises(ValueError, match="stop must be a non-empty string"):
        models.gill_text(prompt, 4, stop=" ")


# ---------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def env(tmp_path_factory, make_model, sbert_path):
    root = tmp_path_factory.mktemp("minigpt5")
    model_dir = str(root / "gill")
    make_model().save_pretrained(model_dir)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(text_metrics, "load_wordnet", StandInWordNet)  # no WordNet data offline
        yield {"root": root, "model": model_dir, "clip": register_tiny_open_clip(str(root)), "sbert": sbert_path,
               "fid": export_module(ChannelMeans(), str(root / "fid.pt2")),
               "is": export_module(ColourLogits(), str(root / "is.pt2")), "cache": str(root / "fid_cache")}


def _results(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def _metric_args(env, fid: bool = True) -> list[str]:
    fid_args = ["--fid-feature", env["fid"], "--fid-cache", env["cache"]] if fid else []
    return ["--clip-model", env["clip"], "--is-feature", env["is"], "--is-splits", "2", *fid_args]


def _clip_embeddings(env, images=(), texts=()) -> tuple[torch.Tensor, torch.Tensor]:
    """Image and text embeddings of the tiny open_clip, computed directly from its weights file."""
    import open_clip

    arch, _, weights = env["clip"].removeprefix("open_clip:").partition("/")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=weights)
    model.eval()
    with torch.no_grad():
        image_embeds = model.encode_image(torch.stack([preprocess(Image.open(p).convert("RGB")) for p in images])
                                          ) if images else None
        text_embeds = model.encode_text(open_clip.get_tokenizer(arch)(list(texts))) if texts else None
    return image_embeds, text_embeds


def _cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).numpy()


def _mtimes(out) -> dict:
    return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns for d, _, files in os.walk(out)
            for f in files if f.endswith((".png", ".txt", ".json")) and "results" not in f}


def test_minigpt5_vist_end_to_end_matches_direct_metrics_and_resumes(env, monkeypatch):
    from eval_fixtures import write_vist

    from gill_hf.cli import main
    from gill_hf.evaluation import EvaluatedModels, load_vist
    from gill_hf.evaluation.minigpt5_vist import story_steps

    annotations, image_dir = write_vist(env["root"], num_stories=2)
    out = str(env["root"] / "vist_out")
    argv = ["eval", "minigpt5-vist", env["model"], "--out", out, "--annotations", annotations, "--image-dir",
            image_dir, "--seeds", "0", "--steps", "1", "--sbert-model", env["sbert"], "--max-new-tokens", "4",
            *_metric_args(env)]
    real_gill, calls = EvaluatedModels.gill, []

    def interrupted(self, context, seed):
        calls.append(seed)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real_gill(self, context, seed)

    monkeypatch.setattr(EvaluatedModels, "gill", interrupted)
    assert main(argv) == 130  # killed during GILL's 5th image: 2 SD + 4 GILL images are on disk
    on_disk = [f for _, _, files in os.walk(out) for f in files if f != SETTINGS_NAME]  # each row's record
    assert len(on_disk) == 6 and all(f.endswith(".png") for f in on_disk)  # whole PNGs only, no temporary file
    monkeypatch.setattr(EvaluatedModels, "gill", real_gill)
    assert main(argv) == 0
    results = _results(out)
    # final step: SD 2 + GILL 4 types x 2; all steps: SD 10 + GILL 10, the final steps' images shared with Table 1
    assert results["images"] == {"generated": 26 - 6, "reused": 6 + 4}
    tables = results["tables"]
    assert [(r["model"], r["setting"]) for r in tables["final-step"]["rows"]] == [
        ("Stable Diffusion", "ground-truth caption"), ("GILL", "no context"), ("GILL", "text context"),
        ("GILL", "image context"), ("GILL", "image-text context")]
    assert set(tables["all-steps"]["rows"][0]) == {"model", "setting", "clip_i", "fid"}
    steps = [step for ex in load_vist(annotations, image_dir) for step in story_steps(ex)]
    finals = steps[4::5]
    for table, examples in (("final-step", finals), ("all-steps", steps)):
        targets = [ex.target for ex in examples]
        real = ChannelMeans()(uint8_pixels(targets)).double().numpy()
        target_embeds = _clip_embeddings(env, targets)[0]
        for row in tables[table]["rows"]:
            key = "sd-ground-truth_caption" if row["model"] != "GILL" else \
                f"gill-{row['setting'].replace(' ', '_')}-minigpt5"  # the default prompt format's own folder
            generated = [os.path.join(out, "images", key, "0", f"{ex.example_id}.png") for ex in examples]
            assert row["clip_i"]["mean"] == pytest.approx(
                _cosine(_clip_embeddings(env, generated)[0], target_embeds).mean(), rel=1e-4)
            fake = ChannelMeans()(uint8_pixels(generated)).double().numpy()
            assert row["fid"]["mean"] == pytest.approx(_frechet(real, fake), rel=1e-3, abs=1e-6)
            if table == "final-step":
                assert row["inception_score"]["mean"] == pytest.approx(InceptionScorer(ColourLogits(), 2).score(
                    [generated]), rel=1e-5)
    texts = [Path(out, "texts", "gill-narration-minigpt5", "greedy", f"{s.example_id}.txt").read_text()
             for s in steps]
    narration = tables["narration"]["rows"][0]
    references = [s.texts[-1] for s in steps]
    assert narration["rouge_l"]["mean"] == pytest.approx(np.mean(text_metrics.rouge_l(texts, references)))
    assert narration["meteor"]["mean"] == pytest.approx(np.mean(
        [meteor_score([wordpunct_tokenize(r.lower())], wordpunct_tokenize(t.lower()), wordnet=StandInWordNet())
         for t, r in zip(texts, references)]))
    assert narration["sbert"]["mean"] == pytest.approx(np.mean(
        text_metrics.SentenceSimilarity(env["sbert"]).scores(texts, references)), rel=1e-5)
    markdown = Path(out, "results.md").read_text()
    assert "| Stable Diffusion | ground-truth caption |" in markdown and "METEOR ↑" in markdown
    assert "clip_t" not in json.dumps(tables)  # no VIST CLIP-T against the [IMG] placeholder string

    before = _mtimes(out)
    assert main(argv) == 0
    again = _results(out)
    assert again["images"] == {"generated": 0, "reused": 30} and _mtimes(out) == before
    assert all(again["tables"][t]["rows"] == tables[t]["rows"] for t in tables)
    assert again["tables"]["narration"]["texts"] == {"generated": 0, "reused": 10}
    assert not tables["final-step"]["fid_reference"]["reused"] and again["tables"]["final-step"]["fid_reference"] == {
        "file": tables["final-step"]["fid_reference"]["file"], "reused": True}


def test_cc3m_end_to_end_clip_t_and_cached_reference(env):
    from gill_hf.cli import main

    tsv, folder = write_cc3m(env["root"], num_images=4)
    out = str(env["root"] / "cc3m_out")
    argv = ["eval", "cc3m", env["model"], "--out", out, "--tsv", tsv, "--seeds", "0", "1", "--steps", "1",
            *_metric_args(env)]
    assert main(argv) == 0
    results = _results(out)
    assert results["images"] == {"generated": 16, "reused": 0} and not results["fid_reference"]["reused"]
    captions = [line.split("\t")[0] for line in Path(tsv).read_text().splitlines()[1:]]
    targets = [os.path.join(folder, f"{i:09d}.jpg") for i in range(4)]
    target_embeds, text_embeds = _clip_embeddings(env, targets, captions)
    real = ChannelMeans()(uint8_pixels(targets)).double().numpy()
    for row in results["rows"]:
        key = "gill-caption" if row["model"] == "GILL" else "sd-caption"
        clip_i, clip_t, fid = [], [], []
        for seed in (0, 1):
            generated = [os.path.join(out, "images", key, str(seed), f"{i:06d}.png") for i in range(4)]
            embeds = _clip_embeddings(env, generated)[0]
            clip_i.append(_cosine(embeds, target_embeds).mean())
            clip_t.append(_cosine(embeds, text_embeds).mean())
            fid.append(_frechet(real, ChannelMeans()(uint8_pixels(generated)).double().numpy()))
        np.testing.assert_allclose(row["clip_i"]["values"], clip_i, rtol=1e-4)
        np.testing.assert_allclose(row["clip_t"]["values"], clip_t, rtol=1e-4)
        np.testing.assert_allclose(row["fid"]["values"], fid, rtol=1e-3, atol=1e-6)
        assert len(row["inception_score"]["values"]) == 2
    assert "| GILL | caption |" in Path(out, "results.md").read_text()
    assert main(argv) == 0
    again = _results(out)
    assert again["images"] == {"generated": 0, "reused": 16} and again["rows"] == results["rows"]
    assert again["fid_reference"] == {"file": results["fid_reference"]["file"], "reused": True}


def _hand_mm_relevance(pairs) -> float:
    """pairs: per modality (reference has it, prediction has it, cosine); Divter's -1 / -2 rules by hand."""
    total = sum(c for r, p, c in pairs if r and p)
    predicted, reference = sum(p for _, p, _ in pairs), sum(r for r, _, _ in pairs)
    precision, recall = total / predicted if predicted else 0.0, total / reference
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def test_mmdialog_end_to_end_per_dialogue_then_averaged(env, monkeypatch, capsys):
    from torchmetrics.functional.text import bleu_score, rouge_score

    from gill_hf.chat_templates import MINIGPT5_MMDIALOG_SYSTEM_PROMPT
    from gill_hf.cli import main
    from gill_hf.evaluation import EvaluatedModels
    from gill_hf.evaluation.contexts import context_image
    from gill_hf.evaluation.mmdialog import minigpt5_response_prompt
    from gill_hf.training.mmdialog import read_mmdialog

    real_response, calls = EvaluatedModels.gill_response, []

    def with_images(self, context, seed, max_new_tokens, stop):  # the tiny GILL never emits [IMG0] by itself
        calls.append((context, stop))
        text, image = real_response(self, context, seed, max_new_tokens, stop)
        return text, image if image is not None or len(calls) == 2 else self.gill(context, seed)

    monkeypatch.setattr(EvaluatedModels, "gill_response", with_images)
    path, folder = write_mmdialog(env["root"])
    out = str(env["root"] / "mmdialog_out")
    argv = ["eval", "mmdialog", env["model"], "--out", out, "--annotations", path, "--seeds", "0", "--steps", "1",
            "--sbert-model", env["sbert"], "--max-new-tokens", "4", *_metric_args(env, fid=False)]
    assert main(argv) == 0
    results = _results(out)
    assert results["num_dialogues"] == 2 and results["num_responses"] == 3  # turns 1, 2 of the first, 1 of the second
    predictions = {}
    for cid, turn in ((300, 1), (300, 2), (301, 1)):
        answers = os.path.join(out, "responses", "gill-minigpt5", "0")  # the default prompt format's own folder
        with open(os.path.join(answers, f"{cid}-turn{turn}.json")) as f:
            saved = json.load(f)
        predictions[cid, turn] = (saved["text"], saved["image"] and os.path.join(answers, saved["image"]))
    sbert = text_metrics.SentenceSimilarity(env["sbert"])
    expected = {name: [] for name in ("bleu_1", "bleu_2", "rouge_l", "sbert", "mm_relevance")}
    for c, cid in enumerate((300, 301)):
        turns = range(1, len(MMDIALOG_TURNS[c]))
        refs = [MMDIALOG_TURNS[c][t] for t in turns]
        preds = [predictions[cid, t] for t in turns]
        expected["bleu_1"].append(np.mean([float(bleu_score([p], [[r]], n_gram=1)) for (p, _), (r, _) in
                                           zip(preds, refs)]))
        expected["bleu_2"].append(np.mean([float(bleu_score([p], [[r]], n_gram=2)) for (p, _), (r, _) in
                                           zip(preds, refs)]))
        expected["rouge_l"].append(np.mean([float(rouge_score(p, r, rouge_keys="rougeL")["rougeL_fmeasure"])
                                            for (p, _), (r, _) in zip(preds, refs)]))
        expected["sbert"].append(np.mean(sbert.scores([p for p, _ in preds], [r for r, _ in refs])))
        pairs = []
        for (text, image), (ref_text, media) in zip(preds, refs):
            text_cos = float(_cosine(*_clip_embeddings(env, texts=[text, ref_text])[1].split(1))[0]) if text else 0
            pairs.append((True, bool(text), text_cos))
            image_cos = float(_cosine(*_clip_embeddings(env, [image, os.path.join(folder, f"{media}.jpg")])[0]
                                      .split(1))[0]) if image and media else 0
            pairs.append((media is not None, image is not None, image_cos))
        expected["mm_relevance"].append(_hand_mm_relevance(pairs))
    images = [predictions[key][1] for key in ((300, 1), (301, 1))]
    assert predictions[300, 2][1] is None and None not in images  # extra, missing and matched images
    row = results["rows"][0]
    assert row["inception_score"]["mean"] == pytest.approx(InceptionScorer(ColourLogits(), 2).score([images]))
    for name, values in expected.items():
        assert row[name]["mean"] == pytest.approx(np.mean(values), rel=1e-4, abs=1e-7), name
    assert "MM-Relevance ↑" in Path(out, "results.md").read_text()
    # the default prompts are MiniGPT-5's (window, roles, <Img> placeholders), answers stopped at its "###"
    dialogues = read_mmdialog(path)
    responses = [(dialogues[0], 1), (dialogues[0], 2), (dialogues[1], 1)]
    assert results["prompt_format"] == "minigpt5"
    assert [(part_values(context), stop) for context, stop in calls] == [
        (part_values(minigpt5_response_prompt(dialogue, turn)), "###") for dialogue, turn in responses]
    assert _flat(calls[1][0]) == (MINIGPT5_MMDIALOG_SYSTEM_PROMPT + "###Human: we saw a dog at the park "
                                  "<Img><|image|></Img>\n###Assistant: a big dog\n###Human:")
    assert main(argv) == 0
    again = _results(out)
    assert again["responses"] == {"generated": 0, "reused": 3} and again["rows"] == results["rows"]
    calls.clear()
    before = _mtimes(out)
    capsys.readouterr()
    assert main([*argv, "--max-new-tokens", "5"]) == 1  # answers of 4 tokens are not reported as 5's
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"gill-hf: error: {os.path.join(out, 'responses', 'gill-minigpt5')} holds answers made with other settings "
        "(max_new_tokens 4 -> 5); rerun with those settings")
    assert not calls and _mtimes(out) == before
    assert main([*argv, "--prompt-format", "plain"]) == 0  # today's inputs, answered anew
    plain = _results(out)
    assert plain["prompt_format"] == "plain" and plain["responses"] == {"generated": 3, "reused": 0}
    first = context_image(os.path.join(folder, "101.jpg"))
    assert [(part_values(context), stop) for context, stop in calls] == [
        (part_values(["we saw a dog at the park", first]), None),
        (part_values(["we saw a dog at the park", first, "a big dog"]), None), (["the beach"], None)]
    assert all(_mtimes(out)[name] == mtime for name, mtime in before.items())  # MiniGPT-5-format answers kept
    assert "fid_feature" not in results  # MMDialog has no FID, nor its options
    assert main([*argv, "--fid-cache", env["cache"]]) == 2


def test_bad_inputs_are_named_before_any_model_loads(tmp_path, capsys, monkeypatch, tiny_backbones):
    from gill_hf.cli import main

    model = tmp_path / "not_a_model"  # never read: every error below comes first
    model.mkdir()
    common = [str(model), "--out", str(tmp_path / "out"), "--fid-cache", str(tmp_path / "cache")]

    def error(argv) -> str:
        assert main(["eval", *argv]) in (1, 2)
        return capsys.readouterr().err

    tsv, _ = write_cc3m(tmp_path, num_images=3)
    lines = Path(tsv).read_text().splitlines()
    Path(tsv).write_text("\n".join([*lines[:2], "a caption without an image", lines[3]]) + "\n")
    assert f"{tsv}, line 3" in error(["cc3m", *common, "--tsv", tsv])
    conversations, _ = write_mmdialog(tmp_path)
    first = Path(conversations).read_text().splitlines()[0]
    Path(conversations).write_text(first + "\n" + '{"conversation_id": 9, "conversation": "hi"}\n')
    no_fid = common[:3]  # mmdialog has no --fid-cache
    assert f"{conversations}, line 2: 'conversation'" in error(["mmdialog", *no_fid, "--annotations", conversations])
    not_sis = tmp_path / "sis.json"
    not_sis.write_text(json.dumps({"images": []}))
    assert str(not_sis) in error(["minigpt5-vist", *common, "--annotations", str(not_sis), "--image-dir",
                                  str(tmp_path)])
    assert "full CLIP" in error(["cc3m", *common, "--tsv", write_cc3m(tmp_path / "ok", 2)[0], "--clip-model",
                                 tiny_backbones["clip"]])
    monkeypatch.setattr(text_metrics, "load_wordnet", REAL_LOAD_WORDNET)
    import nltk

    monkeypatch.setattr(nltk.data, "path", [str(tmp_path)])
    from eval_fixtures import write_vist

    annotations, image_dir = write_vist(tmp_path, num_stories=1)
    assert "python -m nltk.downloader wordnet" in error(["minigpt5-vist", *no_fid, "--annotations", annotations,
                                                         "--image-dir", image_dir, "--tables", "narration"])
    assert "--is-splits" in error(["cc3m", *common, "--tsv", tsv, "--is-splits", "1"])
    assert "no Stable Diffusion baseline" in error(["mmdialog", *no_fid, "--annotations", conversations,
                                                    "--no-baseline"])
    narration = ["minigpt5-vist", *no_fid, "--annotations", annotations, "--image-dir", image_dir, "--tables",
                 "narration"]
    assert "narrations are greedy" in error([*narration, "--seeds", "0", "1"])
    assert "narration has no Stable Diffusion baseline" in error([*narration, "--no-baseline"])
    assert "add final-step to --tables" in error([*narration, "all-steps", "--prompt-types", "text"])
    assert "--clip-model, --is-splits, --fid-cache do not apply to --tables narration" in error(
        [*narration, "--clip-model", "open_clip:ViT-B-32/openai", "--is-splits", "4", *common[3:]])
    assert "--sbert-model do not apply to --tables final-step" in error(
        ["minigpt5-vist", *common, "--annotations", annotations, "--image-dir", image_dir, "--tables", "final-step",
         "--sbert-model", "x"])


def test_minigpt5_vist_prompt_format_switch_inputs_results_and_stores(env, monkeypatch, capsys):
    from eval_fixtures import write_vist

    from gill_hf.cli import main
    from gill_hf.evaluation import load_vist
    from gill_hf.evaluation.contexts import ImageExample, context_image
    from gill_hf.evaluation.minigpt5_vist import (
        PROMPT_TYPES,
        evaluate_minigpt5_vist,
        minigpt5_narration_prompt,
        minigpt5_step_prompt,
        story_steps,
    )
    from gill_hf.pipeline_gill import GILLPipeline

    annotations, image_dir = write_vist(env["root"] / "formats", num_stories=2)  # IS needs 2 images a row
    out = str(env["root"] / "formats_out")
    argv = ["eval", "minigpt5-vist", env["model"], "--out", out, "--annotations", annotations, "--image-dir",
            image_dir, "--tables", "final-step", "narration", "--steps", "1", "--sbert-model", env["sbert"],
            "--max-new-tokens", "3", *_metric_args(env)]
    real_call, calls = GILLPipeline.__call__, []

    def recording(self, prompt=None, **kwargs):
        calls.append((prompt, kwargs))
        return real_call(self, prompt, **kwargs)

    monkeypatch.setattr(GILLPipeline, "__call__", recording)
    stories = [story_steps(example) for example in load_vist(annotations, image_dir)]
    steps, finals, types = [step for story in stories for step in story], [s[-1] for s in stories], \
        list(PROMPT_TYPES.values())

    def run(*extra) -> dict:
        calls.clear()
        assert main([*argv, *extra]) == 0
        return _results(out)

    results = run()  # the default: MiniGPT-5's prompts, narrations stopped at its "###"
    assert results["prompt_format"] == "minigpt5"
    assert [part_values(prompt) for prompt, _ in calls] == [
        part_values(minigpt5_step_prompt(final, t)) for t in types for final in finals] + [
        part_values(minigpt5_narration_prompt(step)) for step in steps]
    assert [kwargs.get("stop_strings") for _, kwargs in calls] == [None] * 8 + [["###"]] * 10
    assert results["images"] == {"generated": 10, "reused": 0}
    assert results["tables"]["narration"]["texts"] == {"generated": 10, "reused": 0}

    results = run("--prompt-format", "plain")  # today's inputs; nothing cached under "minigpt5" is reused
    assert results["prompt_format"] == "plain"

    def plain(final: ImageExample) -> list[list]:
        texts, images = final.texts, [context_image(path) for path in final.context_images]
        interleaved = [part for text, image in zip(texts, images) for part in (text, image)]
        return [[texts[-1]], [" ".join(texts)], [*images, texts[-1]], [*interleaved, texts[-1]]] + [
            ["Story:", *interleaved[:2 * j], context_image(path)] for j, path in enumerate([*final.context_images,
                                                                                            final.target])]

    expected = [plain(final) for final in finals]
    assert [part_values(prompt) for prompt, _ in calls] == [
        part_values(prompts[t]) for t in range(4) for prompts in expected] + [
        part_values(prompt) for prompts in expected for prompt in prompts[4:]]
    assert all("stop_strings" not in kwargs for _, kwargs in calls)
    assert results["images"] == {"generated": 8, "reused": 2}  # the Stable Diffusion baseline is shared
    assert results["tables"]["narration"]["texts"] == {"generated": 10, "reused": 0}

    results = run()  # each format finds its own answers again
    assert not calls and results["images"] == {"generated": 0, "reused": 10}
    assert results["tables"]["narration"]["texts"] == {"generated": 0, "reused": 10}
    capsys.readouterr()
    before = _mtimes(out)
    # narrations of 3 tokens are not reported as 4's, refused before seed 1's new images are made
    assert main([*argv, "--max-new-tokens", "4", "--seeds", "0", "1"]) == 1 and not calls and _mtimes(out) == before
    assert capsys.readouterr().err.splitlines()[-1].startswith(
        f"gill-hf: error: {os.path.join(out, 'texts', 'gill-narration-minigpt5')} holds answers made with other "
        "settings (max_new_tokens 3 -> 4); rerun with those settings")
    assert not os.path.exists(os.path.join(out, "images", "sd-ground-truth_caption", "1"))

    assert main([*argv, "--prompt-format", "vicuna"]) == 2
    assert "argument --prompt-format: invalid choice: 'vicuna'" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"prompt_format must be one of \['plain', 'minigpt5'\], got 'vicuna'"):
        evaluate_minigpt5_vist(None, [], out, [0], None, None, prompt_format="vicuna")
