"""Streamed stage-1 data: img2dataset shards and datasets streaming split per process, seeded shuffle buffers,
workers that keep the single-process batches, skip-and-count of bad samples, and the exact resume position."""

import io
import itertools
import json
import os
import random
import subprocess
import sys
import tarfile

import datasets
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from gill_hf.cli import main
from gill_hf.training import GILLDataCollator, StopAtStepCallback, StreamingCaptionDataset, train_gill
from gill_hf.training.streaming import _shuffled, find_shards
from gill_hf.training.targets import KEYS_NAME, TargetStore, precompute_targets

COLOURS = ["red", "green", "blue", "yellow", "cyan", "magenta", "white", "black", "orange", "purple"]
QUIET = dict(disable_tqdm=True, use_cpu=True, dataloader_num_workers=0, report_to="none", logging_steps=1)


def _jpg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (20, 16), colour).save(buffer, format="JPEG")
    return buffer.getvalue()


def _add(tar, name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _write_shards(folder, num_shards: int = 4, per_shard: int = 3, bad: bool = False) -> list[str]:
    """img2dataset-style shards 00000.tar ...: key.jpg / key.txt / key.json; with ``bad``, shard 0 also holds a
    sample without an image, one without a caption, one with a broken jpg and one with an empty caption."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(num_shards):
        path = folder / f"{s:05d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(s * per_shard, (s + 1) * per_shard):
                key = f"{i:09d}"
                _add(tar, f"{key}.jpg", _jpg(COLOURS[i % len(COLOURS)]))
                _add(tar, f"{key}.txt", f"a {COLOURS[i % len(COLOURS)]} square, number {i}".encode())
                _add(tar, f"{key}.json", json.dumps({"url": f"http://x/{i}.jpg", "key": key}).encode())
            if bad and s == 0:
                _add(tar, "000000900.txt", b"no image here")
                _add(tar, "000000901.jpg", _jpg("red"))
                _add(tar, "000000902.jpg", b"not a jpeg")
                _add(tar, "000000902.txt", b"a broken image")
                _add(tar, "000000903.jpg", _jpg("blue"))
                _add(tar, "000000903.txt", b"  ")
        paths.append(str(path))
    return paths


def _tar_keys(path: str) -> list[str]:
    """The sample keys of a tar in file order (independent of the library's reader)."""
    with tarfile.open(path) as tar:
        names = [member.name.split(".")[0] for member in tar.getmembers()]
    return [f"{path}#{key}" for key in dict.fromkeys(names)]


def _keys(dataset, n: int) -> list[str]:
    return [item["key"] for item in itertools.islice(iter(dataset), n)]


@pytest.fixture
def shards(tmp_path):
    return _write_shards(tmp_path / "shards", bad=True)


def test_shards_are_found_from_patterns_folders_and_lists_and_bad_ones_named(tmp_path, shards):
    folder = tmp_path / "shards"
    assert find_shards(str(folder / "{00000..00003}.tar")) == shards
    assert find_shards(str(folder)) == shards == find_shards(shards)
    with pytest.raises(ValueError, match=r"no such file"):
        find_shards(str(folder / "{00000..00004}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no webdataset shards \(\*.tar files\) in the folder"):
        find_shards(str(tmp_path / "empty"))
    (tmp_path / "fake.tar").write_bytes(b"not a tar" * 100)
    with pytest.raises(ValueError, match=r"fake.tar is not a tar file"):
        find_shards([shards[0], str(tmp_path / "fake.tar")])


def test_processes_read_disjoint_whole_shards_pass_after_pass(shards):
    firsts = []
    for rank in (0, 1):
        stream = StreamingCaptionDataset.from_shards(shards)
        stream.set_split(rank, 2, batch_size=1)
        own = _tar_keys(shards[rank]) + _tar_keys(shards[rank + 2])  # every 2nd shard from the rank
        assert _keys(stream, 3 * len(own)) == own * 3
        firsts.append(set(own))
    assert not firsts[0] & firsts[1]
    assert firsts[0] | firsts[1] == {key for shard in shards for key in _tar_keys(shard)}
    with pytest.raises(ValueError, match=r"4 webdataset shard\(s\) for 8 processes"):
        StreamingCaptionDataset.from_shards(shards).set_split(0, 8, batch_size=1)


def test_shuffle_buffer_is_seeded_and_yields_each_row_once():
    out = list(itertools.islice(_shuffled(itertools.count(), 5, random.Random(0)), 200))
    assert len(set(out)) == 200 and out != sorted(out)  # nothing repeated, nothing invented
    assert all(value < t + 5 for t, value in enumerate(out))  # a row waits in the buffer; none is read ahead


def test_shard_streams_shuffle_by_seed(shards):
    every = [key for shard in shards for key in _tar_keys(shard)]

    def shuffled(seed):
        return _keys(StreamingCaptionDataset.from_shards(shards, shuffle_buffer=5, seed=seed), 2 * len(every))

    first = shuffled(0)
    assert first == shuffled(0) and first != shuffled(1)
    assert first[:len(every)] != every and set(first) == set(every)
    one = [_keys(StreamingCaptionDataset.from_shards(shards[1:2], shuffle_buffer=3, seed=seed), 9) for seed in (0, 1)]
    assert one[0] != one[1]  # one shard, no shard order to draw: the buffer follows the seed too


def test_workers_yield_the_single_process_batches(shards):
    stream = StreamingCaptionDataset.from_shards(shards, shuffle_buffer=4, seed=3)
    stream.set_split(0, 1, batch_size=3)

    def batches(workers):
        loader = DataLoader(stream, batch_size=3, num_workers=workers, collate_fn=lambda items: [i["key"] for i in items])
        return list(itertools.islice(iter(loader), 7))

    alone = batches(0)
    assert alone == [_keys(stream, 21)[i:i + 3] for i in range(0, 21, 3)]
    assert batches(2) == alone


def test_bad_samples_are_skipped_and_counted_not_crashes(shards, make_model):
    items = list(itertools.islice(iter(StreamingCaptionDataset.from_shards(shards[:1])), 7))
    errors = {item["key"].split("#")[1]: item["error"] for item in items}
    assert "no image" in errors["000000900"] and "no caption" in errors["000000901"]
    assert errors["000000902"] is None and items[5]["image"] == b"not a jpeg"  # decoded by the collator only
    collator = GILLDataCollator(make_model().processor, max_length=16)
    batch = collator(items)
    assert (collator.num_skipped, collator.num_seen) == (4, 7) and batch["input_ids"].shape[0] == 3
    torch.testing.assert_close(batch["pixel_values"], make_model().processor.preprocess_images(
        [Image.open(io.BytesIO(_jpg(c))).convert("RGB") for c in COLOURS[:3]]))


class _Recording(GILLDataCollator):
    """Records the keys of every example it is handed (bad ones included)."""

    def __call__(self, examples):
        self.seen.append([ex["key"] for ex in examples])
        return super().__call__(examples)


def _run(make_model, stream, out, max_steps, **kwargs):
    model = make_model(pack_prob=0.0)
    collator = _Recording(model.processor, max_length=16)
    collator.seen = []
    trainer = train_gill(model, stream, str(out), data_collator=collator, max_steps=max_steps,
                         per_device_train_batch_size=3, gradient_accumulation_steps=2, save_strategy="steps",
                         save_steps=100, **QUIET, **kwargs)
    return trainer, collator.seen


def test_killed_and_resumed_run_sees_the_uninterrupted_samples(shards, make_model, tmp_path):
    def stream():
        return StreamingCaptionDataset.from_shards(shards, shuffle_buffer=4, seed=7)

    trainer, whole = _run(make_model, stream(), tmp_path / "whole", 4)
    trainer.train()
    assert len(whole) == 8 and len({k for batch in whole for k in batch}) < 24  # 24 samples: past one pass
    killed, before = _run(make_model, stream(), tmp_path / "killed", 4, callbacks=[StopAtStepCallback(2)])
    killed.train()
    assert before == whole[:4] and killed.state.global_step == 2
    resumed, after = _run(make_model, stream(), tmp_path / "killed", 4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.train_dataset.start == 2 * 2 * 3 and resumed.state.global_step == 4
    assert after == whole[4:]  # no batch re-read, none lost, the shuffle buffer's order kept


def test_datasets_streams_are_split_per_process_and_train(tmp_path, make_model):
    shards = _write_shards(tmp_path / "clean", num_shards=2, per_shard=4)
    hf = datasets.load_dataset("webdataset", data_files={"train": shards}, split="train", streaming=True)
    columns = {"caption": "txt", "image": "jpg"}
    parts = []
    for rank in (0, 1):
        stream = StreamingCaptionDataset.from_hf_dataset(hf, columns)
        stream.set_split(rank, 2, batch_size=1)
        parts.append(_keys(stream, 4))
        assert _keys(stream, 8) == parts[-1] * 2
    assert sorted(parts[0] + parts[1]) == sorted(f"{p}#{k.split('#')[1]}" for p in shards for k in _tar_keys(p))
    with pytest.raises(ValueError, match=r"lack \['caption'\]"):
        StreamingCaptionDataset.from_hf_dataset(hf.rename_column("txt", "words"), {"image": "jpg"})
    trainer, seen = _run(make_model, hf, tmp_path / "run", 2, columns=columns)
    trainer.train()
    assert isinstance(trainer.train_dataset, StreamingCaptionDataset) and len(seen) == 4
    old = precompute_targets(["a red square, number 0"], tmp_path / "old", lambda c: torch.zeros(len(c), 2, 3),
                             progress=False)
    os.remove(os.path.join(old, KEYS_NAME))  # a store written before caption keys: refused before training
    with pytest.raises(ValueError, match="has no caption keys"):
        train_gill(make_model(), hf, str(tmp_path / "t"), columns=columns, targets=TargetStore(old), max_steps=1,
                   **QUIET)


TWO_PROCESS_SCRIPT = """
import json, os, sys
from gill_hf import GILLForConditionalGeneration
from gill_hf.training import GILLDataCollator, StreamingCaptionDataset, train_gill

opt, clip, shards, out = sys.argv[1:]
model = GILLForConditionalGeneration.from_backbones(opt, clip, mapper_hidden_dim=32, mapper_num_heads=4,
                                                    mapper_ffn_dim=64, mapper_encoder_layers=1,
                                                    mapper_decoder_layers=1, pack_prob=0.0)
seen = []
class Recording(GILLDataCollator):
    def __call__(self, examples):
        seen.extend(ex["key"] for ex in examples)
        return super().__call__(examples)
trainer = train_gill(model, StreamingCaptionDataset.from_shards(shards), out, use_cpu=True, max_steps=2,
                     per_device_train_batch_size=2, data_collator=Recording(model.processor, max_length=16),
                     disable_tqdm=True, dataloader_num_workers=0)
trainer.train()
with open(os.path.join(out, f"keys-{trainer.args.process_index}.json"), "w") as f:
    json.dump(seen, f)
"""


def test_two_processes_train_on_their_own_shards(tmp_path, tiny_backbones):
    shards = _write_shards(tmp_path / "shards", num_shards=2, per_shard=4)
    script = tmp_path / "train.py"
    script.write_text(TWO_PROCESS_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29531", str(script), tiny_backbones["opt"], tiny_backbones["clip"],
                             str(tmp_path / "shards"), str(tmp_path / "run")], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    seen = [json.loads((tmp_path / "run" / f"keys-{rank}.json").read_text()) for rank in (0, 1)]
    assert seen == [_tar_keys(shards[0]), _tar_keys(shards[1])]  # 2 steps x 2 samples: each rank its own shard


def _usage(capsys, argv, message):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_cli_streams_shards_and_names_bad_sources_before_loading(capsys, monkeypatch, tmp_path, shards,
                                                                 tiny_backbones):
    base = ["train", "--set", f"model.text_model={tiny_backbones['opt']}", "--set",
            f"model.vision_model={tiny_backbones['clip']}", "--set", f"training.output_dir={tmp_path / 'run'}"]
    folder = tmp_path / "shards"
    with monkeypatch.context() as patched:
        patched.setattr("gill_hf.commands.train.build_model", lambda *a: pytest.fail("a model loaded"))
        _usage(capsys, base + ["--train-shards", str(folder / "{00000..00009}.tar")], "data.shards: webdataset shard")
        _usage(capsys, base + ["--train-shards", str(tmp_path)], "no webdataset shards (*.tar files) in the folder")
        (tmp_path / "x.tar").write_text("text")
        _usage(capsys, base + ["--train-shards", str(tmp_path / "x.tar")], "x.tar is not a tar file")
        _usage(capsys, base + ["--train-shards", str(folder)], "a stream has no length: set training.max_steps")
        _usage(capsys, base + ["--train-shards", str(folder), "--set", "data.tsv=" + shards[0]],
               "or data.dataset, exactly one; got ['tsv', 'shards']")
        _usage(capsys, base + ["--train-shards", str(folder), "--streaming"], "data.streaming applies to data.dataset")
        _usage(capsys, base + ["--train-dataset", str(tmp_path / "nope"), "--streaming"],
               "data.dataset: no such file or folder")
    code = main(base + ["--train-shards", str(folder), "--set", "training.max_steps=2", "--set",
                        "data.shuffle_buffer=3", "--set", "training.per_device_train_batch_size=4", "--set",
                        "training.use_cpu=true", "--set", "training.report_to=none"])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "config.json").exists()
