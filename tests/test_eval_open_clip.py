"""The CLIP-similarity metric also takes an open_clip model (``open_clip:<arch>[/<pretrained>]``)."""

import json

import torch
import torch.nn.functional as F

from gill_hf.evaluation.metrics import ClipImageEmbedder
from gill_hf.toy_world import shape_corpus

TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                  "text_cfg": {"context_length": 8, "vocab_size": 64, "width": 32, "heads": 2, "layers": 1}}


def test_open_clip_embeddings_equal_encode_image(tmp_path):
    import open_clip

    (tmp_path / "gill-tiny-vit.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(tmp_path / "gill-tiny-vit.json")
    images = [image for image, _ in shape_corpus(3, seed=4, size=40)]

    torch.manual_seed(0)
    embedder = ClipImageEmbedder("open_clip:gill-tiny-vit", batch_size=2)  # random weights (no pretrained tag)
    got = embedder.embed(images)
    with torch.no_grad():
        direct = embedder.model.encode_image(torch.stack([embedder.preprocess(im) for im in images]))
    assert got.shape == (3, 16) and torch.allclose(got, direct, atol=1e-5)
    cosine = F.cosine_similarity(got[0:1], got[1:2]).item()
    assert -1.0 <= cosine < 1.0  # different images, different embeddings
