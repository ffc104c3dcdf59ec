"""Target precompute under torchrun (2 processes, CPU): the shards split between the ranks, a killed run resumed,
the store equal to a one-process run's row for row. Run as a script, this file is the worker of those tests."""

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch

from gill_hf.resumable import process_share
from gill_hf.training.targets import TargetStore, precompute_targets, shard_name

CAPTIONS = [f"a picture of thing {i}" for i in range(9)]  # shards of 2: 0-3 to ranks 0, 1, 0, 1; 4 to rank 0
SETTINGS = dict(batch_size=1, shard_size=2, dtype="float32")
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


class LoggingEncoder:
    """Deterministic (n, 2, 3) rows from each caption's text; logs every caption it encodes to ``log`` and raises
    once it has encoded ``fail_after`` captions (a fault injected mid-run)."""

    def __init__(self, log=None, fail_after=None):
        self.log, self.fail_after, self.encoded = log, fail_after, 0

    def __call__(self, captions):
        for caption in captions:
            if caption and self.fail_after is not None and self.encoded >= self.fail_after:
                raise RuntimeError("injected fault")
            if caption and self.log:
                with open(self.log, "a") as handle:
                    handle.write(caption + "\n")
            self.encoded += bool(caption)
        return torch.tensor([[[len(c), sum(map(ord, c)) % 101, 0.25], [c.count("1"), -1.0, 0.5]] for c in captions])


def _torchrun(*args, check=True):
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             *args], env=ENV, capture_output=True, text=True, timeout=240)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _logged(folder, run):
    files = {rank: folder / f"{run}-rank{rank}.log" for rank in (0, 1)}
    return {rank: file.read_text().split("\n")[:-1] if file.exists() else [] for rank, file in files.items()}


def _assert_stores_equal(a, b):
    assert json.loads((a / "index.json").read_text()) == json.loads((b / "index.json").read_text())
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))  # no staging files left either
    one, two = TargetStore(a), TargetStore(b)
    assert torch.equal(one.null, two.null)
    assert all(torch.equal(one[i], two[i]) for i in range(len(one)))


def test_killed_two_process_run_resumes_to_the_one_process_store(tmp_path):
    precompute_targets(CAPTIONS, tmp_path / "whole", LoggingEncoder(), progress=False, **SETTINGS)
    out = tmp_path / "out"
    killed = _torchrun(__file__, str(out), "killed", check=False)  # rank 1 dies after its first shard
    assert killed.returncode != 0 and "injected fault" in killed.stderr
    logs = _logged(tmp_path, "killed")
    assert logs[1] == CAPTIONS[2:4]  # shard 1, then the fault
    assert all(CAPTIONS.index(c) // 2 % 2 == 0 for c in logs[0])  # rank 0 only encodes its own shards
    written = sorted(f for f in os.listdir(out) if f.startswith("shard"))
    assert shard_name(1) in written and shard_name(3) not in written, written
    assert not [f for f in os.listdir(out) if f.startswith(".")], "no half-written files"
    for name in written:  # every part on disk is whole
        assert np.load(out / name).shape == (len(CAPTIONS[2 * int(name[6:11]):][:2]), 2, 3)
    with pytest.raises(ValueError, match="incomplete"):
        TargetStore(out)

    log = tmp_path / "resumed.log"  # resumed by one process: the split may change between runs
    precompute_targets(CAPTIONS, out, LoggingEncoder(log), progress=False, **SETTINGS)
    _assert_stores_equal(tmp_path / "whole", out)
    redone = [c for s in range(5) if shard_name(s) not in written for c in CAPTIONS[2 * s:2 * s + 2]]
    assert log.read_text().split("\n")[:-1] == redone  # only the missing shards

    with pytest.raises(ValueError, match=r"another source or settings \(\['null_sha256'\] differ\)"):
        precompute_targets(CAPTIONS, out, lambda c: LoggingEncoder()(c) + 1, progress=False, **SETTINGS)
    with pytest.raises(ValueError, match=r"\(\['batch_size'\] differ\)"):
        precompute_targets(CAPTIONS, out, LoggingEncoder(), progress=False, **{**SETTINGS, "batch_size": 2})


def test_cli_under_torchrun_equals_one_process(tiny_backbones, tmp_path, single_thread):
    from gill_hf.cli import main

    tsv = tmp_path / "train.tsv"
    tsv.write_text("caption\timage\n" + "".join(f"{c}\t{i}.png\n" for i, c in enumerate(CAPTIONS[:5])))
    common = ["precompute-targets", str(tsv), "--diffusion-model", tiny_backbones["sd"], "--dtype", "float32",
              "--batch-size", "1", "--shard-size", "2"]
    assert main([*common[:2], str(tmp_path / "one"), *common[2:], "--no-progress"]) == 0
    two = _torchrun("-m", "gill_hf.cli", *common[:2], str(tmp_path / "two"), *common[2:])
    _assert_stores_equal(tmp_path / "one", tmp_path / "two")
    assert two.stdout.count("targets for 5 captions") == 1  # printed by rank 0 only
    assert "targets: 100%|██████████| 5/5 " in two.stderr  # rank 0's bar counts both ranks' shards


def test_process_share_and_cli_refusals(monkeypatch, tmp_path):
    from gill_hf.cli import main

    assert process_share() == (0, 1, False)
    assert process_share(1, 3) == (1, 3, False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert process_share() == (1, 2, True)
    assert process_share(0, 1) == (0, 1, False)  # an explicit share wins
    with pytest.raises(ValueError, match="give both process_index and num_processes"):
        process_share(0)
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK=2 does not lie in \[0, WORLD_SIZE=2\)"):
        process_share()
    monkeypatch.setenv("RANK", "1")
    tsv = tmp_path / "t.tsv"
    tsv.write_text("caption\timage\na\t0.png\n")
    base = ["precompute-targets", str(tsv), str(tmp_path / "out"), "--diffusion-model", str(tmp_path)]
    assert main([*base, "--process-index", "0", "--num-processes", "2"]) == 2  # refused before any model loads
    monkeypatch.delenv("WORLD_SIZE")
    assert main([*base, "--process-index", "0"]) == 2
    assert not (tmp_path / "out").exists()


def test_launched_rank_0_waits_for_the_others_and_counts_their_shards(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")  # this thread is rank 0 of a launch; rank 1 starts once rank 0's part is done

    def rank1():
        while not (tmp_path / shard_name(4)).exists():  # rank 0's last shard
            time.sleep(0.05)
        precompute_targets(CAPTIONS, tmp_path, LoggingEncoder(), process_index=1, num_processes=2, progress=False,
                           **SETTINGS)

    thread = threading.Thread(target=rank1)
    thread.start()
    precompute_targets(CAPTIONS, tmp_path, LoggingEncoder(), **SETTINGS)
    assert len(TargetStore(tmp_path)) == 9  # complete on return: rank 0 waited for rank 1's shards
    assert "targets: 100%|██████████| 9/9 " in capsys.readouterr().err  # its bar counted them (5 of its own)
    thread.join()


def _worker(out_dir: str, run: str):
    """One rank of the kill test: the fake encoder, rank 1 failing after its first shard; every caption it encodes
    logged beside ``out_dir``."""
    rank = int(os.environ["RANK"])
    log = os.path.join(os.path.dirname(out_dir), f"{run}-rank{rank}.log")
    encoder = LoggingEncoder(log, fail_after=2 if rank == 1 else None)
    precompute_targets(CAPTIONS, out_dir, encoder, **SETTINGS)


if __name__ == "__main__":
    _worker(*sys.argv[1:])
