"""Training-data faults: structural errors found when a file is read (naming file and line / story), empty
captions and unreadable images skipped and counted, image paths confined to their folder, the end-of-training
summary."""

import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from gill_hf.processing_gill import GILLProcessor
from gill_hf.tiny import build_tiny_tokenizer, tiny_image_processor
from gill_hf.training import (CaptionImageDataset, GILLDataCollator, InterleavedDataCollator, VISTTaskDataset,
                              read_vist_stories, train_gill)
from gill_hf.training.data import SkippedExamplesCallback, as_caption_dataset

COLOURS = ["red", "green", "blue", "yellow", "white", "black"]


@pytest.fixture(scope="module")
def processor():
    return GILLProcessor(tiny_image_processor(), build_tiny_tokenizer())


def _images(folder, n: int) -> list[str]:
    """n solid-colour PNGs ``images/<i>.png`` under ``folder``; returns their relative names."""
    os.makedirs(folder / "images", exist_ok=True)
    names = [f"images/{i}.png" for i in range(n)]
    for name, colour in zip(names, COLOURS):
        Image.new("RGB", (12, 10), colour).save(folder / name)
    return names


def _tsv(folder, rows: list[str]) -> str:
    path = folder / "train.tsv"
    path.write_text("caption\timage\n" + "\n".join(rows) + "\n", encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------------------------------------------- read time
@pytest.mark.parametrize("row, message", [
    ("a red square images/0.png", r"line 3: 1 TAB-separated field\(s\) where the header .* has 2"),
    ("a red\tsquare\timages/0.png", r"line 3: 3 TAB-separated field\(s\)"),
    ("a red square\t", r"line 3: the image path is '', expected a non-empty file name"),
    ("a red square\t../outside.png", r"line 3: image path '../outside.png' leaves the image folder"),
    ("a red square\timages/../../outside.png", r"line 3: image path 'images/../../outside.png' leaves"),
    ("a red square\t/etc/passwd", r"line 3: image path '/etc/passwd' leaves the image folder"),
])
def test_tsv_structure_errors_name_file_and_line(tmp_path, row, message):
    _images(tmp_path, 1)
    path = _tsv(tmp_path, ["a green square\timages/0.png", row])
    with pytest.raises(ValueError, match=rf"train.tsv, {message}"):
        CaptionImageDataset.from_tsv(path)


def test_tsv_inner_dotdot_and_non_utf8(tmp_path):
    _images(tmp_path, 1)
    (tmp_path / "other").mkdir()
    ok = CaptionImageDataset.from_tsv(_tsv(tmp_path, ["a red square\tother/../images/0.png"]))
    assert ok[0]["error"] is None and ok[0]["image"].size == (12, 10)  # '..' that stays inside is fine
    bad = tmp_path / "latin1.tsv"
    bad.write_bytes("caption\timage\ncaf\xe9\timages/0.png\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.tsv is not UTF-8 text"):
        CaptionImageDataset.from_tsv(bad)


def test_empty_captions_are_skipped_and_counted_when_read(tmp_path, caplog):
    names = _images(tmp_path, 5)
    rows = ["a red square\t" + names[0], "  \t" + names[1], "a blue square\t" + names[2], "", "\t" + names[3],
            "a white square\t" + names[4]]
    with caplog.at_level(logging.WARNING):
        ds = CaptionImageDataset.from_tsv(_tsv(tmp_path, rows))
    assert "skipped 2 example(s) with an empty caption (line 3, line 6)" in caplog.text  # blank line 5 is no row
    assert ds.num_skipped_captions == 2 and ds.captions == ["a red square", "a blue square", "a white square"]
    assert [ds[i]["image"].getpixel((0, 0)) for i in range(3)] == [(255, 0, 0), (0, 0, 255), (255, 255, 255)]
    with pytest.raises(ValueError, match="every caption is empty"):
        CaptionImageDataset.from_tsv(_tsv(tmp_path, [" \t" + names[0]]))
    direct = CaptionImageDataset(["x", "", None], [names[0]] * 3, str(tmp_path))
    assert direct.captions == ["x"] and direct.num_skipped_captions == 2
    with pytest.raises(ValueError, match="example 1: the caption is a int, expected a str"):
        CaptionImageDataset(["x", 3], [names[0]] * 2)


def _sis(folder, annotations) -> str:
    path = folder / "sis.json"
    path.write_text(json.dumps({"annotations": [[a] for a in annotations]}))
    return str(path)


def _step(story, order, photo, text="then we saw it"):
    return {"story_id": story, "photo_flickr_id": photo, "text": text, "worker_arranged_photo_order": order}


def test_vist_missing_fields_and_types_name_file_and_story(tmp_path):
    broken = _step("s7", 1, "11")
    del broken["text"]
    with pytest.raises(ValueError, match=r"sis.json, annotation 1 \(story s7\) lacks field\(s\) \['text'\]"):
        read_vist_stories(_sis(tmp_path, [_step("s7", 0, "10"), broken]))
    no_story = _step("s7", 0, "10")
    del no_story["story_id"]
    with pytest.raises(ValueError, match=r"annotation 0 lacks field\(s\) \['story_id'\]"):
        read_vist_stories(_sis(tmp_path, [no_story]))
    with pytest.raises(ValueError, match=r"\(story s1\): 'worker_arranged_photo_order' is 'first', expected an int"):
        read_vist_stories(_sis(tmp_path, [_step("s1", "first", "10")]))
    with pytest.raises(ValueError, match=r"\(story s1\): 'text' is a list, expected a str"):
        read_vist_stories(_sis(tmp_path, [_step("s1", 0, "10", text=["x"])]))
    cleaned = tmp_path / "cleaned.json"
    cleaned.write_text(json.dumps({"42": [{"caption": "a", "image_id": "1", "sequence_index": 0},
                                          {"caption": "b", "sequence_index": 1}]}))
    with pytest.raises(ValueError, match=r"cleaned.json, story 42, step 1 lacks field\(s\) \['image_id'\]"):
        read_vist_stories(cleaned)
    cleaned.write_text("{not json")
    with pytest.raises(ValueError, match="cleaned.json is not a JSON file"):
        read_vist_stories(cleaned)


def test_vist_empty_text_skips_the_story_and_bad_paths_are_refused(tmp_path, caplog):
    path = _sis(tmp_path, [_step("a", 0, "1"), _step("a", 1, "2"), _step("b", 0, "3"), _step("b", 1, "4", " "),
                           _step("c", 0, "5")])
    with caplog.at_level(logging.WARNING):
        ds = VISTTaskDataset.from_json(path)
    assert "skipped 1 story with an empty text (story b)" in caplog.text
    assert ds.skipped_stories == ["b"] and [[s["image"] for s in story] for story in ds.stories] == [["1", "2"], ["5"]]
    escape = _sis(tmp_path, [_step("a", 0, "../../etc/passwd")])
    with pytest.raises(ValueError, match=r"story 0, step 0: image path '../../etc/passwd' leaves the image folder"):
        VISTTaskDataset.from_json(escape)
    with pytest.raises(ValueError, match="story 0, step 1: empty text ''"):
        VISTTaskDataset([[{"text": "x", "image": "1"}, {"text": "", "image": "2"}]], str(tmp_path))


def test_symlink_out_of_the_image_folder_is_skipped_with_its_path(tmp_path, processor, caplog):
    names = _images(tmp_path / "data", 2)
    outside = tmp_path / "secret.png"
    Image.new("RGB", (12, 10), "black").save(outside)
    os.symlink(outside, tmp_path / "data" / "images" / "link.png")
    os.symlink(tmp_path / "data" / names[1], tmp_path / "data" / "images" / "inside.png")  # stays in: fine
    ds = CaptionImageDataset.from_tsv(_tsv(tmp_path / "data", ["a red square\t" + names[0],
                                                               "a secret\timages/link", "a green\timages/inside"]))
    assert ds[1]["image"] is None and "images/link.png' resolves to" in ds[1]["error"]
    assert str(outside) in ds[1]["error"] and "outside the image folder" in ds[1]["error"]
    assert ds[2]["error"] is None and ds[2]["image"].getpixel((0, 0)) == (0, 128, 0)
    collator = GILLDataCollator(processor, max_length=16)
    with caplog.at_level(logging.WARNING):
        batch = collator([ds[i] for i in range(3)])
    assert batch["input_ids"].shape[0] == 2 and collator.num_skipped == 1 and "secret.png" in caplog.text


# ---------------------------------------------------------------------------------------------------- load time
def _faulty_files(folder) -> dict[str, str]:
    """Relative names of a good 20x20 PNG, a truncated 30x30 PNG, random bytes named .jpg and a 40x40 'bomb'."""
    os.makedirs(folder, exist_ok=True)
    png = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, (30, 30, 3), dtype=np.uint8)
    Image.fromarray(noise).save(png, format="PNG")
    (folder / "truncated.png").write_bytes(png.getvalue()[:len(png.getvalue()) // 2])
    (folder / "noise.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    Image.new("RGB", (40, 40), "red").save(folder / "bomb.png")
    Image.new("RGB", (20, 20), "blue").save(folder / "good.png")
    return {"good": "good.png", "truncated": "truncated.png", "noise": "noise.jpg", "bomb": "bomb.png"}


def test_dataset_side_faults_keep_the_rest_of_the_batch(tmp_path, processor, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 40x40 image is a bomb, the 20x20 one is not
    files = _faulty_files(tmp_path)
    order = ["truncated", "good", "bomb", "noise", "good"]
    ds = CaptionImageDataset([f"caption {i}" for i in range(5)], [files[k] for k in order], str(tmp_path))
    items = [ds[i] for i in range(5)]
    assert [item["image"] is None for item in items] == [True, False, True, True, False]
    assert "bomb.png" in items[2]["error"] and "MAX_IMAGE_PIXELS = 1000" in items[2]["error"]
    collator = GILLDataCollator(processor, max_length=16, ldm_image_size=8)
    with caplog.at_level(logging.WARNING):
        batch = collator(items)
    assert (collator.num_skipped, collator.num_seen) == (3, 5)
    for name in ("truncated.png", "bomb.png", "noise.jpg"):
        assert name in caplog.text
    good = Image.new("RGB", (20, 20), "blue")
    assert torch.equal(batch["input_ids"], processor.encode_captions(["caption 1", "caption 4"], max_length=16)
                       ["input_ids"])
    assert torch.equal(batch["pixel_values"], processor.preprocess_images([good, good]))
    assert batch["ldm_pixel_values"].shape == (2, 3, 8, 8)


def test_collator_side_faults_keep_the_rest_of_the_batch(tmp_path, processor, monkeypatch):
    """Items from a custom dataset holding paths / lazily opened images: the collator decodes and skips."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    files = {k: str(tmp_path / v) for k, v in _faulty_files(tmp_path).items()}
    with Image.open(files["truncated"]) as lazy:
        items = [{"index": 0, "caption": "zero", "image": files["bomb"]},
                 {"index": 1, "caption": "one", "image": files["good"]},
                 {"index": 2, "caption": "two", "image": lazy},
                 {"index": 3, "caption": "   ", "image": files["good"]},
                 {"index": 4, "caption": "four", "image": Image.new("RGB", (1, 400))},
                 {"index": 5, "caption": "five", "image": files["noise"]},
                 {"index": 6, "caption": "six", "image": Image.new("I;16", (20, 20), 65535)}]
        collator = GILLDataCollator(processor, max_length=16, ldm_image_size=8)
        batch = collator(items)
    assert (collator.num_skipped, collator.num_seen) == (5, 7)
    assert torch.equal(batch["input_ids"], processor.encode_captions(["one", "six"], max_length=16)["input_ids"])
    white = Image.new("RGB", (20, 20), "white")  # the 16-bit image: 65535 -> 255
    assert torch.equal(batch["pixel_values"][1], processor.preprocess_images([white])[0])
    with pytest.raises(ValueError, match=r"every example of this batch was skipped \(1 skipped"):
        collator(items[:1])


def test_interleaved_collator_skips_an_example_with_a_broken_context_image(tmp_path, processor):
    files = {k: str(tmp_path / v) for k, v in _faulty_files(tmp_path).items()}
    good = Image.new("RGB", (20, 20), "blue")  # (0, 0, 255)

    def example(i, context_image):
        return {"index": i, "task": "gen", "context": ["first", context_image], "instruction": "Draw it",
                "instruction_image": None, "output_image": good, "target_text": "", "error": None}

    collator = InterleavedDataCollator(processor, max_length=128)
    with Image.open(files["truncated"]) as lazy:
        batch = collator([example(0, lazy), example(1, good), example(2, Image.new("RGB", (0, 3)))])
    assert collator.num_skipped == 2 and batch["input_ids"].shape[0] == 1
    assert torch.equal(batch["pixel_values"], processor.preprocess_images([good]))


def test_hf_datasets_decode_here_and_skip(tmp_path, processor):
    import datasets

    good = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(good, format="PNG")
    table = {"image": [{"bytes": good.getvalue(), "path": None}, {"bytes": b"garbage", "path": None},
                       {"bytes": good.getvalue(), "path": None}], "text": ["a red square", "broken", ""]}
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    ds = as_caption_dataset(datasets.Dataset.from_dict(table, features=features))
    assert len(ds) == 2 and ds.num_skipped_captions == 1  # the empty caption is dropped when wrapped
    assert ds[0]["image"].getpixel((0, 0)) == (255, 0, 0) and ds[1]["image"] is None
    assert "could not decode image '<7 bytes>'" in ds[1]["error"]  # decoded by gill_hf, not inside datasets
    stream = as_caption_dataset(datasets.Dataset.from_dict(table, features=features).to_iterable_dataset())
    items = list(stream)
    assert [item["image"] is None for item in items] == [False, True, False]
    collator = GILLDataCollator(processor, max_length=16)
    batch = collator(items)  # the garbage image and the streamed empty caption are skipped here
    assert collator.num_skipped == 2 and batch["input_ids"].shape[0] == 1


# ---------------------------------------------------------------------------------------------------- summary
def test_summary_is_logged_per_epoch_and_at_train_end(tmp_path, make_model, caplog):
    names = _images(tmp_path, 4)
    (tmp_path / "images" / "3.png").write_bytes(b"not a png")
    ds = CaptionImageDataset.from_tsv(_tsv(tmp_path, [f"a {c} square\t{n}" for c, n in zip(COLOURS, names)]))
    trainer = train_gill(make_model(gen_loss_weight=0.0), ds, str(tmp_path / "run"), num_train_epochs=2,
                         per_device_train_batch_size=4, disable_tqdm=True, use_cpu=True, dataloader_num_workers=0,
                         logging_steps=1, seed=0)
    assert any(isinstance(c, SkippedExamplesCallback) for c in trainer.callback_handler.callbacks)
    with caplog.at_level(logging.WARNING, logger="gill_hf.training.data"):
        trainer.train()
    summaries = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage() and "of" in r.getMessage()
                 and "skipping" not in r.getMessage()]
    assert summaries == ["epoch 1: skipped 1 of 4 examples", "epoch 2: skipped 1 of 4 examples",
                         "training: skipped 2 of 8 examples (each one logged when skipped)"]


# ---------------------------------------------------------------------------------------------------- evaluation
def test_evaluation_readers_name_faults(tmp_path, caplog):
    from gill_hf.evaluation.contexts import load_caption_set, load_visdial, load_vist

    names = _images(tmp_path, 2)
    coco = tmp_path / "captions.json"
    images = [{"id": 1, "file_name": names[0]}, {"id": 2, "file_name": "../escape.png"}]
    annotations = [{"image_id": 1, "caption": " "}, {"image_id": 1, "caption": "a red square"}]
    coco.write_text(json.dumps({"images": images[:1], "annotations": annotations}))
    with caplog.at_level(logging.WARNING):
        (example,) = load_caption_set(coco)
    assert example.texts == ["a red square"] and "skipped 1 empty caption" in caplog.text  # the next one is taken
    coco.write_text(json.dumps({"images": images, "annotations": [{"image_id": 2, "caption": "x"}]}))
    with pytest.raises(ValueError, match=r"captions.json, caption 2: image path '../escape.png' leaves"):
        load_caption_set(coco)
    coco.write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(ValueError, match=r"captions.json, images\[0\] lacks field\(s\) \['file_name'\]"):
        load_caption_set(coco)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    Image.new("RGB", (4, 4)).save(outside)
    os.symlink(outside, tmp_path / "images" / "link.png")
    coco.write_text(json.dumps({"images": [{"id": 3, "file_name": "images/link.png"}],
                                "annotations": [{"image_id": 3, "caption": "x"}]}))
    with pytest.raises(ValueError, match=r"caption 3: image '.*link.png' resolves to .*outside the image folder"):
        load_caption_set(coco)
    sis = _sis(tmp_path, [_step("s", j, "../../x" if j == 4 else str(j % 2)) for j in range(5)])
    with pytest.raises(ValueError, match=r"story 0: image path '../../x' leaves the image folder"):
        load_vist(sis, tmp_path / "images")
    visdial = tmp_path / "visdial.json"
    dialog = {"image_id": 0, "dialog": [{"question": 0, "answer": 5}]}
    visdial.write_text(json.dumps({"data": {"dialogs": [dialog], "questions": ["is it red"], "answers": ["yes"]}}))
    with pytest.raises(ValueError, match=r"dialog of image 0, round 0: question 0 / answer 5 is not an index of the "
                                         r"file's 1 questions / 1 answers"):
        load_visdial(visdial, tmp_path / "images")
    dialog["dialog"] = [{"answer": 0}]
    visdial.write_text(json.dumps({"data": {"dialogs": [dialog], "questions": ["is it red"], "answers": ["yes"]}}))
    with pytest.raises(ValueError, match=r"round 0 lacks field\(s\) \['question'\]"):
        load_visdial(visdial, tmp_path / "images")
    visdial.write_text(json.dumps({"data": {"dialogs": [{"dialog": []}], "questions": [], "answers": []}}))
    with pytest.raises(ValueError, match=r"dialogs\[0\] lacks field\(s\) \['image_id'\]"):
        load_visdial(visdial, tmp_path / "images")
