"""Caption-keyed target stores: lookups by caption equal the positional rows, stores from shards / datasets equal the
TSV's bit for bit, streamed batches carry the text encoder's output of exactly their captions, and streams train
with l_g from the command line; stores without keys and captions a store lacks are named errors."""

import hashlib
import itertools
import json
import os

import datasets
import numpy as np
import pytest
import torch
from test_streaming import QUIET, _write_shards
from test_targets import FakeEncoder

from gill_hf.cli import main
from gill_hf.training import GILLDataCollator, StreamingCaptionDataset, train_gill
from gill_hf.training.targets import KEYS_NAME, DiffusionTextEncoder, TargetStore, precompute_targets

CAPTIONS = [f"caption {i % 7}" + " " * (i % 2) for i in range(17)]  # repeats, and captions equal but for a space


def _store(tmp_path, captions=CAPTIONS, **kwargs) -> TargetStore:
    return TargetStore(precompute_targets(captions, tmp_path, FakeEncoder(), batch_size=3, shard_size=5,
                                          dtype="float32", progress=False, **kwargs))


def test_caption_lookups_equal_the_positional_rows(tmp_path):
    store = _store(tmp_path)
    stored = np.load(tmp_path / KEYS_NAME)
    assert stored.dtype == np.dtype("<u8") and stored.tolist() == [
        int.from_bytes(hashlib.blake2b(c.encode(), digest_size=8).digest(), "little") for c in CAPTIONS]
    queries = [CAPTIONS[i] for i in np.random.default_rng(0).permutation(len(CAPTIONS))] + CAPTIONS[:3]
    rows = store.rows_for(queries)
    for caption, row in zip(queries, rows):
        assert CAPTIONS[row] == caption  # a row of exactly this caption (brute force over the positions)
    assert store.rows_for([]).tolist() == []
    with pytest.raises(ValueError, match=r"holds no target for the caption 'caption 9' \(1 of this batch's 2 "):
        store.rows_for(["caption 1", "caption 9"])
    with pytest.raises(ValueError, match="holds no target for the caption ' caption 2'"):  # exact strings
        store.rows_for([" caption 2"])


def test_stores_without_keys_or_with_wrong_keys_are_named_and_a_rerun_adds_them(tmp_path):
    _store(tmp_path)
    keys = np.load(tmp_path / KEYS_NAME)
    os.remove(tmp_path / KEYS_NAME)  # a store written before caption keys
    old = TargetStore(tmp_path)
    old.check_captions(CAPTIONS)  # positional use is unchanged
    with pytest.raises(ValueError, match=r"has no caption keys \(caption-keys.npy.*re-run `gill-hf "
                                         r"precompute-targets` with the same captions"):
        old.rows_for(["caption 1"])
    with pytest.raises(ValueError, match="has no caption keys"):
        GILLDataCollator(None, targets=old, targets_by="caption")
    encoder = FakeEncoder()
    precompute_targets(CAPTIONS, tmp_path, encoder, batch_size=3, shard_size=5, dtype="float32", progress=False)
    assert encoder.calls == 1 and np.array_equal(np.load(tmp_path / KEYS_NAME), keys)  # only "" re-encoded
    assert TargetStore(tmp_path).rows_for(["caption 1"]).tolist() == [CAPTIONS.index("caption 1")]
    np.save(tmp_path / KEYS_NAME, keys[:-1])
    with pytest.raises(ValueError, match=r"holds uint64 \(16,\), expected uint64 \(17,\), one key per row"):
        TargetStore(tmp_path).rows_for(["caption 1"])
    with pytest.raises(ValueError, match=r"targets_by must be one of \('index', 'caption'\), got 'key'"):
        GILLDataCollator(None, targets_by="key")


def test_colliding_caption_keys_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("gill_hf.training.targets.caption_keys", lambda captions: np.zeros(len(captions), "<u8"))
    with pytest.raises(ValueError, match="captions 'a' and 'b' share the 64-bit caption key 0x0000000000000000"):
        precompute_targets(["a", "a", "b"], tmp_path / "store", FakeEncoder(), progress=False)
    assert not (tmp_path / "store").exists()  # nothing written: the remedy (change a caption) works in place
    monkeypatch.undo()
    precompute_targets(["a", "a", "b "], tmp_path / "store", FakeEncoder(), progress=False)


def test_precompute_from_shards_and_datasets_equals_the_tsv_bit_for_bit(tmp_path, tiny_backbones, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    shards = _write_shards(tmp_path / "shards", num_shards=2, per_shard=3, bad=True)
    captions = StreamingCaptionDataset.from_shards(shards).read_captions()
    # the shards' txt captions in tar order, less the blank one and the one without an image (never trained on)
    squares = [f"a {c} square, number {i}" for i, c in enumerate(["red", "green", "blue", "yellow", "cyan",
                                                                  "magenta"])]
    assert captions == squares[:3] + ["a broken image"] + squares[3:]
    tsv = tmp_path / "train.tsv"
    tsv.write_text("caption\timage\n" + "".join(f"{c}\t{i}.jpg\n" for i, c in enumerate(captions)))
    common = ["--diffusion-model", tiny_backbones["sd"], "--dtype", "float32", "--shard-size", "4", "--no-progress"]
    assert main(["precompute-targets", str(tsv), str(tmp_path / "from-tsv"), *common]) == 0
    assert main(["precompute-targets", str(tmp_path / "from-shards"), "--shards", str(tmp_path / "shards"),
                 *common]) == 0
    names = sorted(os.listdir(tmp_path / "from-tsv"))
    assert KEYS_NAME in names and names == sorted(os.listdir(tmp_path / "from-shards"))
    for name in names:
        assert (tmp_path / "from-tsv" / name).read_bytes() == (tmp_path / "from-shards" / name).read_bytes(), name

    jsonl = tmp_path / "train.jsonl"  # a datasets.Dataset (not streamed): row i = example i, as the TSV
    jsonl.write_text("".join(json.dumps({"text": c, "image": f"{i}.jpg"}) + "\n" for i, c in enumerate(captions)))
    assert main(["precompute-targets", str(tmp_path / "from-json"), "--dataset", "json", "--data-files", str(jsonl),
                 *common]) == 0
    for name in names:
        assert (tmp_path / "from-tsv" / name).read_bytes() == (tmp_path / "from-json" / name).read_bytes(), name

    clean = _write_shards(tmp_path / "clean", num_shards=2, per_shard=3)
    assert main(["precompute-targets", str(tmp_path / "from-clean"), "--shards", *clean, *common]) == 0
    assert main(["precompute-targets", str(tmp_path / "from-dataset"), "--dataset", "webdataset", "--data-files",
                 *clean, "--streaming", "--caption-column", "txt", "--image-column", "jpg", *common]) == 0
    for name in os.listdir(tmp_path / "from-clean"):
        assert (tmp_path / "from-clean" / name).read_bytes() == (tmp_path / "from-dataset" / name).read_bytes()


def _precompute_usage(capsys, argv, message):
    code = main(["precompute-targets", *argv, "--diffusion-model", "sd"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_precompute_cli_names_bad_sources(capsys, tmp_path, monkeypatch):
    shards = _write_shards(tmp_path / "shards", num_shards=1)
    tsv = tmp_path / "t.tsv"
    tsv.write_text("caption\timage\na\t0.png\n")
    _precompute_usage(capsys, [str(tmp_path / "out")], "exactly one of TSV, --shards, --dataset; got none")
    _precompute_usage(capsys, [str(tsv), "out", "--shards", *shards], "got ['TSV', '--shards']")
    _precompute_usage(capsys, ["out", "--shards", str(tmp_path)], "--shards: no webdataset shards (*.tar files)")
    _precompute_usage(capsys, ["out", "--shards", str(tsv)], "t.tsv is not a tar file")
    _precompute_usage(capsys, ["out", "--shards", *shards, "--caption-column", "txt"],
                      "--caption-column applies to a TSV or --dataset")
    _precompute_usage(capsys, [str(tsv), "out", "--streaming"], "--streaming applies to --dataset only")
    _precompute_usage(capsys, ["out", "--dataset", "./nope"], "--dataset: no such file or folder: ./nope")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    rows = tmp_path / "rows.json"
    rows.write_text('{"words": "a red square"}\n')
    _precompute_usage(capsys, [str(tmp_path / "out"), "--dataset", "json", "--data-files", str(rows)],
                      "--dataset json: ")  # gill-hf train's loader, named by this command's option
    assert not (tmp_path / "out").exists()


def _stream_store(tmp_path, sd: str, shards) -> TargetStore:
    captions = StreamingCaptionDataset.from_shards(shards).read_captions()
    return TargetStore(precompute_targets(captions, tmp_path / "targets", DiffusionTextEncoder(sd), batch_size=4,
                                          dtype="float32", progress=False))


def test_streamed_batches_carry_the_encoders_output_of_their_captions(tmp_path, tiny_backbones, make_model):
    from transformers import CLIPTextModel, CLIPTokenizer

    shards = _write_shards(tmp_path / "shards", bad=True)
    store = _stream_store(tmp_path, tiny_backbones["sd"], shards)
    stream = StreamingCaptionDataset.from_shards(shards, shuffle_buffer=5, seed=3)
    items = list(itertools.islice(iter(stream), 9))
    collator = GILLDataCollator(make_model().processor, max_length=16, targets=store, targets_by="caption")
    batch = collator(items)
    kept = [it["caption"] for it in items if it["error"] is None and it["caption"].strip() and
            it["image"] != b"not a jpeg"]
    assert collator.num_skipped == len(items) - len(kept) and batch["gen_targets"].shape == (len(kept), 77, 32)
    tok = CLIPTokenizer.from_pretrained(tiny_backbones["sd"], subfolder="tokenizer")
    encoder = CLIPTextModel.from_pretrained(tiny_backbones["sd"], subfolder="text_encoder")
    ids = tok(kept + [""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = encoder(input_ids=ids).last_hidden_state  # (n + 1, 77, 32)
    torch.testing.assert_close(batch["gen_targets"], reference[:-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch["null_gen_target"], reference[-1], atol=1e-5, rtol=1e-5)

    other = TargetStore(precompute_targets(["a red square, number 0"], tmp_path / "other", DiffusionTextEncoder(
        tiny_backbones["sd"]), dtype="float32", progress=False))
    with pytest.raises(ValueError, match="holds no target for the caption 'a .* run `gill-hf precompute-targets` "
                                         "on this data"):
        GILLDataCollator(make_model().processor, max_length=16, targets=other, targets_by="caption")(items)
    hf = datasets.load_dataset("webdataset", data_files={"train": shards[1:]}, split="train", streaming=True)
    trainer = train_gill(make_model(pack_prob=0.0), hf, str(tmp_path / "run"), columns={"caption": "txt",
                         "image": "jpg"}, targets=store, max_steps=1, per_device_train_batch_size=3, **QUIET)
    assert trainer.data_collator.targets_by == "caption"
    trainer.train()
    assert [h["gen_loss"] for h in trainer.state.log_history if "gen_loss" in h][0] > 0


def _pooled_encoding(captions):
    """A layout with a pooled vector: ``((n, 3, 2), (n, 4))`` from each caption's text alone."""
    codes = torch.tensor([[len(c), sum(map(ord, c)) % 101, c.count(" "), sum(map(ord, c[-1:]))] for c in captions],
                         dtype=torch.float32)
    return codes[:, :3, None].expand(-1, 3, 2) * torch.tensor([1.0, -1.0]), codes


def test_pooled_targets_are_found_by_caption_too(tmp_path, make_model):
    shards = _write_shards(tmp_path / "shards")
    captions = StreamingCaptionDataset.from_shards(shards).read_captions()
    store = TargetStore(precompute_targets(captions, tmp_path / "t", _pooled_encoding, shard_size=5, dtype="float32",
                                           progress=False))
    items = list(itertools.islice(iter(StreamingCaptionDataset.from_shards(shards, shuffle_buffer=6, seed=1)), 8))
    batch = GILLDataCollator(make_model().processor, max_length=16, targets=store, targets_by="caption")(items)
    sequence, pooled = _pooled_encoding([it["caption"] for it in items])
    assert torch.equal(batch["gen_targets"], sequence) and torch.equal(batch["gen_pooled_targets"], pooled)
    assert torch.equal(batch["null_gen_pooled_target"], _pooled_encoding([""])[1][0])


def test_cli_trains_a_shard_stream_with_targets(capsys, monkeypatch, tmp_path, tiny_backbones):
    shards = _write_shards(tmp_path / "shards", bad=True)
    store = _stream_store(tmp_path, tiny_backbones["sd"], shards)
    base = ["train", "--train-shards", str(tmp_path / "shards"), "--set", f"model.text_model={tiny_backbones['opt']}",
            "--set", f"model.vision_model={tiny_backbones['clip']}", "--set",
            f"model.diffusion_model={tiny_backbones['sd']}", "--set", f"training.output_dir={tmp_path / 'run'}",
            "--set", "training.max_steps=2", "--set", "data.shuffle_buffer=3"]
    os.rename(tmp_path / "targets" / KEYS_NAME, tmp_path / "keys.npy")
    with monkeypatch.context() as patched:
        patched.setattr("gill_hf.commands.train.build_model", lambda *a: pytest.fail("a model loaded"))
        assert main(base + ["--set", f"data.targets={store.path}"]) == 2
        err = capsys.readouterr().err
        assert "data.targets: target store" in err and "has no caption keys" in err and "Traceback" not in err
    os.rename(tmp_path / "keys.npy", tmp_path / "targets" / KEYS_NAME)
    code = main(base + ["--set", f"data.targets={store.path}", "--set", "training.per_device_train_batch_size=4",
                        "--set", "training.use_cpu=true", "--set", "training.report_to=none", "--set",
                        "training.logging_steps=1", "--set", "training.save_strategy=steps",
                        "--set", "training.save_steps=2"])
    assert code == 0, capsys.readouterr().err
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    gen = [h["gen_loss"] for h in state["log_history"] if "gen_loss" in h]
    assert len(gen) == 2 and min(gen) > 0


class _Recording(GILLDataCollator):
    """Records the keys and the gen targets of every batch."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        self.seen.append(([ex["key"] for ex in examples], batch["gen_targets"]))
        return batch


def _keyed_run(make_model, shards, store, out, **kwargs):
    model = make_model(pack_prob=0.0)
    collator = _Recording(model.processor, max_length=16, targets=store, targets_by="caption")
    collator.seen = []
    trainer = train_gill(model, StreamingCaptionDataset.from_shards(shards, shuffle_buffer=4, seed=7), str(out),
                         data_collator=collator, targets=store, max_steps=4, per_device_train_batch_size=3,
                         gradient_accumulation_steps=2, save_strategy="steps", save_steps=100, **QUIET, **kwargs)
    return trainer, collator.seen


def test_a_resumed_stream_with_targets_trains_as_the_uninterrupted_run(tmp_path, tiny_backbones, make_model):
    from gill_hf.training import StopAtStepCallback

    shards = _write_shards(tmp_path / "shards")
    store = _stream_store(tmp_path, tiny_backbones["sd"], shards)
    whole, seen = _keyed_run(make_model, shards, store, tmp_path / "whole")
    whole.train()
    killed, before = _keyed_run(make_model, shards, store, tmp_path / "killed", callbacks=[StopAtStepCallback(2)])
    killed.train()
    resumed, after = _keyed_run(make_model, shards, store, tmp_path / "killed")
    resumed.train(resume_from_checkpoint=True)
    assert len(seen) == 8 and [keys for keys, _ in before + after] == [keys for keys, _ in seen]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(before + after, seen))
    fresh = make_model(pack_prob=0.0).adapter.state_dict()
    trained = whole.model.adapter.state_dict()
    assert resumed.state.global_step == 4
    assert any(not torch.equal(fresh[n], p) for n, p in trained.items() if n.startswith("mapper."))  # l_g trained
    for name, param in trained.items():  # bit for bit
        torch.testing.assert_close(resumed.model.adapter.state_dict()[name], param, rtol=0, atol=0, msg=name)
