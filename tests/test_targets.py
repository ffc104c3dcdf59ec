"""Target precompute: exact rows, resumable after interruption, shardable across processes, CLI."""

import json
import os

import numpy as np
import pytest
import torch

from gill_hf.training.targets import DiffusionTextEncoder, TargetStore, precompute_targets, shard_name

CAPTIONS = [f"caption number {i}" for i in range(11)]


class FakeEncoder:
    """Deterministic (n, 3, 2) encodings from the caption text; counts calls, can fail after ``fail_after``."""

    def __init__(self, fail_after=None):
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, captions):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        return torch.tensor([[[len(c), sum(map(ord, c)) % 97], [i, -i], [0.5, 1.5]] for i, c in enumerate(captions)],
                            dtype=torch.float32)


def expected(i, batch_size=2):
    c, j = CAPTIONS[i], i % batch_size  # j: the row's position in its encoder batch
    return torch.tensor([[len(c), sum(map(ord, c)) % 97], [j, -j], [0.5, 1.5]], dtype=torch.float32)


def test_store_rows_match_encoder(tmp_path):
    store = TargetStore(precompute_targets(CAPTIONS, tmp_path, FakeEncoder(), batch_size=2, shard_size=4,
                                           progress=False, dtype="float32"))
    assert len(store) == 11 and store.shape == (3, 2)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("shard")) == [shard_name(i) for i in range(3)]
    for i in range(11):
        torch.testing.assert_close(store[i], expected(i))
    torch.testing.assert_close(store.null, torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.5, 1.5]]))
    store.check_captions(CAPTIONS)
    with pytest.raises(ValueError, match="does not match"):
        store.check_captions(CAPTIONS[::-1])
    with pytest.raises(IndexError):
        store[11]


def test_interrupted_run_resumes_and_skips_finished_shards(tmp_path):
    with pytest.raises(KeyboardInterrupt):  # 1 null call + 2 shards of 2 batches, then the third shard dies
        precompute_targets(CAPTIONS, tmp_path, FakeEncoder(fail_after=5), batch_size=2, shard_size=4, progress=False)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp")], "no half-written files"
    with pytest.raises(ValueError, match="incomplete"):
        TargetStore(tmp_path)
    encoder = FakeEncoder()
    precompute_targets(CAPTIONS, tmp_path, encoder, batch_size=2, shard_size=4, progress=False)
    assert encoder.calls == 1 + 2  # the null caption + the last shard's two batches only
    store = TargetStore(tmp_path)
    assert all(torch.equal(store[i], expected(i)) for i in range(11))


def test_processes_split_the_shards(tmp_path):
    counts = []
    for rank in (1, 0):
        encoder = FakeEncoder()
        precompute_targets(CAPTIONS, tmp_path, encoder, batch_size=4, shard_size=4, process_index=rank,
                           num_processes=2, progress=False)
        counts.append(encoder.calls - 1)
    assert counts == [1, 2]  # rank 1: shard 1; rank 0: shards 0 and 2
    store = TargetStore(tmp_path)
    assert all(torch.equal(store[i], expected(i, batch_size=4)) for i in range(11))
    with pytest.raises(ValueError, match=r"holds a target store of another source or settings \(\['batch_size', "
                                         r"'captions_sha256'"):
        precompute_targets(CAPTIONS[:5], tmp_path, FakeEncoder(), progress=False)


def test_real_text_encoder_and_cli(tiny_backbones, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    from gill_hf.cli import main

    tsv = tmp_path / "train.tsv"
    tsv.write_text("caption\timage\na red circle\t0.png\na blue square on the left\t1.png\n")
    assert main(["precompute-targets", str(tsv), str(tmp_path / "t"), "--diffusion-model", tiny_backbones["sd"],
                 "--dtype", "float32", "--batch-size", "1"]) == 0
    store = TargetStore(tmp_path / "t")
    tok = CLIPTokenizer.from_pretrained(tiny_backbones["sd"], subfolder="tokenizer")
    enc = CLIPTextModel.from_pretrained(tiny_backbones["sd"], subfolder="text_encoder")
    ids = tok(["a blue square on the left", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = enc(input_ids=ids).last_hidden_state
    assert store.shape == (77, 32) == tuple(DiffusionTextEncoder(tiny_backbones["sd"])(["x"]).shape[1:])
    torch.testing.assert_close(store[1], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(store.null, ref[1], atol=1e-5, rtol=1e-5)
    index = json.loads((tmp_path / "t" / "index.json").read_text())
    assert index["num_items"] == 2 and np.load(tmp_path / "t" / shard_name(0)).dtype == np.float32
