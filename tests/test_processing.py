import numpy as np
import pytest
import torch
from PIL import Image

from gill_hf import GILLProcessor
from gill_hf.processing_gill import to_rgb


@pytest.fixture(scope="module")
def processor(tiny_backbones):
    from transformers import AutoImageProcessor, AutoTokenizer

    return GILLProcessor(AutoImageProcessor.from_pretrained(tiny_backbones["clip"], backend="pil"),
                         AutoTokenizer.from_pretrained(tiny_backbones["opt"]))


def _image(colour="red", size=(20, 16)):
    return Image.new("RGB", size, colour)


def test_interleaved_sample_layout(processor):
    k, ph, bos = 4, processor.image_token_id, processor.tokenizer.bos_token_id
    enc = processor([_image(), "a dog", _image("blue"), "at the beach"])
    ids = enc["input_ids"][0].tolist()
    text1 = processor.tokenizer("a dog", add_special_tokens=False)["input_ids"]
    text2 = processor.tokenizer("at the beach", add_special_tokens=False)["input_ids"]
    assert ids == [ph] * k + [bos] + text1 + [ph] * k + text2  # BOS opens the first text segment only
    assert enc["pixel_values"].shape == (2, 3, 32, 32) and enc["attention_mask"].sum() == len(ids)


def test_image_only_text_only_and_many_images(processor):
    only_image = processor([_image()])["input_ids"][0].tolist()
    assert only_image == [processor.image_token_id] * 4 + [processor.tokenizer.bos_token_id]
    text = processor("just text")
    assert "pixel_values" not in text and text["input_ids"][0, 0] == processor.tokenizer.bos_token_id
    many = processor([_image(c) for c in ["red", "blue", "green", "white", "black", "gray", "pink"]] + ["end"])
    assert many["pixel_values"].shape[0] == 7
    assert int((many["input_ids"] == processor.image_token_id).sum()) == 7 * 4


def test_literal_special_strings_stay_text(processor):
    ids = processor("draw [IMG0] and <|image|> please")["input_ids"][0].tolist()
    assert not set(ids) & set(processor.img_token_ids) and processor.image_token_id not in ids
    assert processor.decode(ids, skip_special_tokens=True).strip() == "draw [IMG0] and <|image|> please"


def test_chat_style_and_batching_with_padding(processor):
    chat = [{"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image", "image": _image()}]}]
    plain = ["Q: look", _image(), "\n"]  # a conversation is rendered with the chat template (GILL's Q:/A: default)
    assert torch.equal(processor(chat)["input_ids"], processor(plain)["input_ids"])
    batch = [["short"], ["a much longer text here", _image()]]
    right = processor(batch)
    left = processor(batch, padding_side="left")
    n0 = int(right["attention_mask"][0].sum())
    assert right["input_ids"].shape == left["input_ids"].shape and right["pixel_values"].shape[0] == 1
    assert right["attention_mask"][0, :n0].all() and not right["attention_mask"][0, n0:].any()
    assert left["attention_mask"][0, -n0:].all() and not left["attention_mask"][0, :-n0].any()
    assert torch.equal(left["input_ids"][0, -n0:], right["input_ids"][0, :n0])
    with pytest.raises(ValueError, match="unknown content part type 'video'"):
        processor([{"type": "video", "video": None}])


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P", "CMYK", "1", "I;16", "I", "F"])
def test_every_image_mode_becomes_rgb(processor, mode):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[:, :4] = (200, 30, 30)
    image = Image.fromarray(rgb).convert(mode) if mode not in ("I;16", "I", "F") else None
    if mode in ("I;16", "I", "F"):
        values = np.full((8, 8), 40000 if mode != "F" else 128.0)
        image = Image.fromarray(values.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
        if mode == "I;16":
            image = image.convert("I;16") if image.mode != "I;16" else image
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (8, 8)
    if mode in ("I;16", "I"):
        assert np.asarray(out)[0, 0].tolist() == [round(40000 / 257)] * 3  # 16-bit rescaled, not clipped to white
    assert processor([image, "x"])["pixel_values"].shape == (1, 3, 32, 32)


def test_transparent_pixels_become_white(processor):
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert np.asarray(to_rgb(rgba))[0, 0].tolist() == [255, 255, 255]


def test_corrupt_image_file_is_named(processor, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png at all")
    with pytest.raises(ValueError, match="could not decode image .*broken.png"):
        processor([bad, "caption"])
    good = tmp_path / "good.png"
    _image().save(good)
    assert processor([good, "caption"])["pixel_values"].shape[0] == 1


def test_captions_keep_their_img_tokens_when_truncated(processor):
    enc = processor.encode_captions(["short", "word " * 100], max_length=20)
    assert enc["input_ids"].shape == (2, 20)
    for row in enc["input_ids"]:
        ids = [t for t in row.tolist() if t != processor.tokenizer.pad_token_id]
        assert ids[0] == processor.tokenizer.bos_token_id and ids[-8:] == processor.img_token_ids
    with pytest.raises(ValueError, match="leaves no room"):
        processor.encode_captions(["x"], max_length=9)


def test_processor_round_trip(processor, tmp_path):
    processor.save_pretrained(tmp_path)
    again = GILLProcessor.from_pretrained(tmp_path)
    assert again.img_token_ids == processor.img_token_ids and again.num_visual_tokens == 4
    sample = ["hello", _image(), "world"]
    a, b = processor(sample), again(sample)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])


def test_text_and_images_convention(processor, tmp_path):
    photo = tmp_path / "photo.png"
    _image("green").save(photo)
    enc = processor(text="look <|image|> here", images=str(photo))  # one path string is one image
    ids = enc["input_ids"][0].tolist()
    look, here = (processor.tokenizer(t, add_special_tokens=False)["input_ids"] for t in ("look ", " here"))
    assert ids == [processor.tokenizer.bos_token_id] + look + [processor.image_token_id] * 4 + here
    assert torch.equal(enc["pixel_values"], processor.preprocess_images([_image("green")]))
    assert processor.batch_decode(enc["input_ids"], skip_special_tokens=True) == ["look  here"]
    with pytest.raises(ValueError, match="but 1 images were given"):  # images no longer go first silently
        processor(text="look here", images=[_image()])
