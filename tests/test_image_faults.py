"""Image faults: broken files, decompression bombs, degenerate sizes, 16-bit data scaled by bit depth."""

import io
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from gill_hf.image_io import MAX_ASPECT_RATIO, load_image, to_rgb
from gill_hf.processing_gill import GILLProcessor
from gill_hf.tiny import build_tiny_tokenizer, tiny_image_processor


@pytest.fixture(scope="module")
def processor():
    return GILLProcessor(tiny_image_processor(), build_tiny_tokenizer())


def _png(path, image) -> str:
    image.save(path)
    return str(path)


def test_truncated_and_random_files_are_named(tmp_path, processor):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (10, 200, 30)).save(good, format="PNG")
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    noise = tmp_path / "noise.jpg"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    for path in (truncated, noise):
        with pytest.raises(ValueError, match=f"could not decode image .*{path.name}"):
            load_image(str(path))
        with pytest.raises(ValueError, match=rf"image 1 \(PosixPath\): could not decode image .*{path.name}"):
            processor.preprocess_images([Image.new("RGB", (8, 8)), path])
    with Image.open(truncated) as lazy, pytest.raises(ValueError, match="could not decode image .*truncated.png"):
        load_image(lazy)  # opened, not decoded: the decode error surfaces at load_image


@pytest.mark.parametrize("side", [11, 15])  # 121 px: PIL's warning level; 225 px: over twice the limit (its error)
def test_decompression_bombs_are_named_and_no_warning_leaks(tmp_path, monkeypatch, side):
    path = _png(tmp_path / "bomb.png", Image.new("RGB", (side, side), "red"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with warnings.catch_warnings(record=True) as leaked:  # as outside pytest: warnings shown, not raised
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match=r"could not decode image .*bomb.png.*MAX_IMAGE_PIXELS = 100"):
            load_image(path)
    assert [w.category for w in leaked] == []
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the limit is PIL's, read at each call
    assert load_image(path).size == (side, side)


def _expected_8bit(values: np.ndarray) -> np.ndarray:
    """v / 65535 * 255, rounded half up, computed in exact rationals."""
    from fractions import Fraction

    return np.array([int(Fraction(int(v) * 255, 65535) + Fraction(1, 2)) for v in values.ravel()]).reshape(values.shape)


def test_16bit_png_is_scaled_by_bit_depth_not_by_its_max(tmp_path):
    values = np.array([[0, 1, 128, 129, 257, 1000], [32767, 32768, 40000, 65407, 65408, 65535]], dtype=np.uint16)
    path = _png(tmp_path / "sixteen.png", Image.fromarray(values))
    image = load_image(path)
    assert image.mode == "I;16"
    out = np.asarray(to_rgb(image))
    assert out.shape == (2, 6, 3) and (out == out[..., :1]).all()
    assert out[..., 0].tolist() == _expected_8bit(values).tolist()
    assert out[0, :4, 0].tolist() == [0, 0, 0, 1] and out[1, -1, 0] == 255
    dark = np.full((4, 4), 200, dtype=np.uint16)  # max 200 of 65535: nearly black, not 200 / 255 bright
    assert np.asarray(to_rgb(load_image(_png(tmp_path / "dark.png", Image.fromarray(dark))))).max() == 1


@pytest.mark.parametrize("mode", ["I;16B", "I"])
def test_other_16bit_modes(mode):
    values = np.array([[0, 200, 40000, 65535]])
    if mode == "I":
        image = Image.fromarray(values.astype(np.int32))
    else:
        image = Image.fromarray(values.astype(">u2"))
    assert image.mode == mode
    assert np.asarray(to_rgb(image))[..., 0].tolist() == _expected_8bit(values).tolist()


def test_32bit_and_nonfinite_images_are_refused():
    with pytest.raises(ValueError, match=r"mode 'I' image holds values in \[-5, 70000\].*0..65535"):
        to_rgb(Image.fromarray(np.array([[-5, 70000]], dtype=np.int32)))
    with pytest.raises(ValueError, match="NaN or infinite"):
        to_rgb(Image.fromarray(np.array([[1.0, np.nan]], dtype=np.float32)))
    assert np.asarray(to_rgb(Image.fromarray(np.array([[-3.0, 7.4, 300.0]], dtype=np.float32))))[0, :, 0].tolist() \
        == [0, 7, 255]  # PIL's "F" convention: the 8-bit scale, clipped


def test_zero_pixel_sides_are_refused(processor):
    with pytest.raises(ValueError, match=r"image 0 \(Image\): image 'PIL image \(RGB, 0x5\)' is 0x5 pixels"):
        processor.preprocess_images([Image.new("RGB", (0, 5))])
    with pytest.raises(ValueError, match=r"array of shape \(0, 4, 3\)' is 4x0 pixels"):
        load_image(np.zeros((0, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="is 3x0 pixels"):
        load_image(torch.zeros(3, 0, 3))


def test_extreme_aspect_ratio_is_refused_before_resizing(tmp_path, processor, monkeypatch):
    path = _png(tmp_path / "strip.png", Image.new("RGB", (1, 4000), "blue"))
    resized = []
    monkeypatch.setattr(Image.Image, "resize", lambda self, *a, **k: resized.append(self.size))
    with pytest.raises(ValueError, match=r"strip.png' is 1x4000 pixels, an aspect ratio of 4000:1; at most 50:1 .*"
                                         r"would make it 224x896000 pixels"):
        processor.preprocess_images([path])
    assert resized == []  # refused before any resize
    monkeypatch.undo()
    edge = Image.new("RGB", (MAX_ASPECT_RATIO, 1))  # the limit itself is accepted
    assert processor.preprocess_images([edge]).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="aspect ratio of 51:1"):
        load_image(Image.new("RGB", (MAX_ASPECT_RATIO + 1, 1)))
