"""Training data: CC3M TSV / datasets input, corrupt images skipped and counted, VIST tasks, collators."""

import logging

import pytest
import torch
from PIL import Image

from gill_hf.training import (CaptionImageDataset, GILLDataCollator, InterleavedDataCollator, TargetStore,
                              VISTTaskDataset, ldm_pixel_values, precompute_targets, read_vist_stories)
from gill_hf.toy_world import shape_image, write_toy_cc3m, write_toy_vist

RELEASE_TSV = "/work/shared/data/gill-release/cc3m_train.tsv"


class RowEncoder:  # (n, 2, 3): caption length, and the row's position in its batch
    def __call__(self, captions):
        return torch.tensor([[[len(c), i, 0.0]] * 2 for i, c in enumerate(captions)], dtype=torch.float32)


def test_release_tsv_format_is_read(tmp_path):
    ds = CaptionImageDataset.from_tsv(RELEASE_TSV, image_dir=str(tmp_path))
    assert ds.captions[:2] == ["author : a life in photography -- in pictures",
                               "the player staring intently at a computer screen ."]
    item = ds[0]
    assert item["image"] is None and "0_1595581236" in item["error"]  # the image is not there: reported
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tpath\nx\ty\n")
    with pytest.raises(ValueError, match="lacks column"):
        CaptionImageDataset.from_tsv(bad)


def test_collator_skips_and_counts_corrupt_images(tmp_path, make_model, caplog):
    model = make_model()
    ds = CaptionImageDataset.from_tsv(write_toy_cc3m(tmp_path, 6, corrupt=2))
    store = TargetStore(precompute_targets(ds.captions, tmp_path / "t", RowEncoder(), batch_size=6,
                                           dtype="float32", progress=False))
    collator = GILLDataCollator(model.processor, max_length=16, targets=store, ldm_image_size=16)
    with caplog.at_level(logging.WARNING):
        batch = collator([ds[i] for i in (5, 0, 4, 2)])
    assert collator.num_skipped == 2 and "00005.png" in caplog.text
    assert batch["input_ids"].shape[0] == batch["pixel_values"].shape[0] == 2
    assert batch["gen_targets"][:, 0, 1].tolist() == [0.0, 2.0]  # rows 0 and 2 of the store, in batch order
    torch.testing.assert_close(batch["null_gen_target"], torch.zeros(2, 3))
    assert batch["ldm_pixel_values"].shape == (2, 3, 16, 16)
    expected = model.processor.encode_captions([ds.captions[0], ds.captions[2]], max_length=16)["input_ids"]
    assert torch.equal(batch["input_ids"], expected)
    with pytest.raises(ValueError, match="every example"):
        collator([ds[5]])


def test_hf_dataset_source(make_model):
    import datasets

    images = [shape_image("red", "circle"), shape_image("blue", "square")]
    ds = CaptionImageDataset.from_hf_dataset(datasets.Dataset.from_dict(
        {"img": images, "txt": ["a red circle", "a blue square"]}), image_column="img", text_column="txt")
    assert len(ds) == 2 and ds[1]["caption"] == "a blue square" and ds[1]["image"].getpixel((11, 20)) == (40, 70, 220)
    with pytest.raises(ValueError, match="lack"):
        CaptionImageDataset.from_hf_dataset(datasets.Dataset.from_dict({"img": images}), image_column="img")


def test_ldm_pixels_pad_white_and_scale():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    px = ldm_pixel_values(image, 8)  # padded to 20x20: rows 0-4 and 15-19 white
    assert px.shape == (3, 8, 8) and px.min() >= -1 and px.max() <= 1
    assert torch.allclose(px[:, 0], torch.ones(3, 8)) and torch.allclose(px[:, 4], -torch.ones(3, 8), atol=0.05)


def test_vist_formats_and_tasks(tmp_path):
    path = write_toy_vist(tmp_path, num_stories=2, steps=3)
    stories = read_vist_stories(path)
    assert len(stories) == 2 and [s["text"] for s in stories[0]] == \
        ["then we saw a red circle", "then we saw a green circle", "then we saw a blue circle"]
    cleaned = tmp_path / "cleaned.json"
    cleaned.write_text('{"9": [{"caption": "b", "image_id": "2", "sequence_index": 1},'
                       ' {"caption": "a", "image_id": "1", "sequence_index": 0}]}')
    assert read_vist_stories(cleaned) == [[{"text": "a", "image": "1"}, {"text": "b", "image": "2"}]]
    ds = VISTTaskDataset(stories, str(tmp_path))
    assert len(ds) == 2 * (3 + 2 * 2)  # "gen" at every step, the other two tasks only with history
    tasks = [ds[i]["task"] for i in range(7)]
    assert tasks.count("gen") == 3 and tasks.count("text") == 2
    with pytest.raises(ValueError, match="unknown VIST task"):
        VISTTaskDataset(stories, str(tmp_path), tasks=("gen", "caption"))


def test_interleaved_collator_labels_and_images(tmp_path, make_model):
    model = make_model()
    proc = model.processor
    ds = VISTTaskDataset.from_json(write_toy_vist(tmp_path, num_stories=1, steps=3))
    by_task = {ds[i]["task"]: ds[i] for i in range(len(ds)) if ds.examples[i][1] == 2}
    collator = InterleavedDataCollator(proc, ldm_image_size=16)
    batch = collator([by_task["gen"], by_task["text_image"], by_task["text"]])
    ids, labels = batch["input_ids"], batch["labels"]
    img = torch.tensor(proc.img_token_ids)
    # Two context images per example (steps 0 and 1) + the "text" task's input image; 2 image outputs.
    assert batch["pixel_values"].shape[0] == 2 + 2 + 3
    assert (ids == proc.image_token_id).sum() == 7 * model.config.num_visual_tokens
    assert batch["ldm_pixel_values"].shape == (2, 3, 16, 16)
    assert (ids.unsqueeze(-1) == img).any(-1).sum(1).tolist() == [8, 8, 0]
    assert ((labels.unsqueeze(-1) == img).any(-1).sum(1)).tolist() == [1, 1, 0]  # only [IMG0] supervised
    eos = proc.tokenizer.eos_token_id
    for row in range(3):
        supervised = labels[row][labels[row] != -100]
        assert supervised[-1] == eos and (batch["attention_mask"][row].sum() - len(supervised)) > 0
    answer = proc.tokenizer(" then we saw a blue circle", add_special_tokens=False)["input_ids"]
    assert labels[2][labels[2] != -100].tolist() == answer + [eos]
    rows, _ = model.img_block_positions(ids)
    assert rows[:, 0].tolist() == [0, 1]


@pytest.mark.parametrize("prompt_format", ["minigpt5", "plain"])
def test_interleaved_collator_keeps_special_token_spellings_in_data_as_text(tmp_path, make_model, prompt_format):
    """A caption that spells "</s>" or "[IMG0]" is text in the prompt, not the EOS / [IMG0] token."""
    model = make_model()
    proc, tok = model.processor, model.processor.tokenizer
    ds = VISTTaskDataset.from_json(write_toy_vist(tmp_path, num_stories=1, steps=3))
    example = next(ds[i] for i in range(len(ds)) if ds[i]["task"] == "gen" and ds.examples[i][1] == 2)
    spelled = f"a red {tok.eos_token} square [IMG0] at the top"
    example = {**example, "context": [spelled if isinstance(p, str) else p for p in example["context"]]}
    batch = InterleavedDataCollator(proc, max_length=512, prompt_format=prompt_format)([example])
    unsupervised = batch["labels"][0] == -100
    prompt = batch["input_ids"][0][unsupervised & (batch["attention_mask"][0] == 1)]
    assert tok.eos_token_id not in prompt.tolist() and proc.img_token_ids[0] not in prompt.tolist()
    as_text = tok(" " + spelled, add_special_tokens=False, split_special_tokens=True)["input_ids"][3:-3]  # inner ids
    assert any(prompt[i:i + len(as_text)].tolist() == as_text for i in range(len(prompt)))

