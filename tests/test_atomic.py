import hashlib
import json
import os
import pathlib
import subprocess
import threading
import time

import pytest

from gill_hf import atomic
from gill_hf.atomic import atomic_path, write_text_atomic


def test_written_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        write_text_atomic(tmp_path / "sub" / "card.md", "hello")
    finally:
        os.umask(mask)
    assert (tmp_path / "sub" / "card.md").read_text() == "hello"
    assert (tmp_path / "sub" / "card.md").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target, ".json") as tmp:
        with open(tmp, "w") as handle:
            handle.write("half")
        raise RuntimeError("crash while writing")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["results.json"]


# ---------------------------------------------------------------------------------------------- whole folders
def _save(target, files: dict[str, str]):
    """One atomic_folder save of ``{relative name: text}``."""
    with atomic.atomic_folder(target) as staging:
        for name, text in files.items():
            os.makedirs(os.path.dirname(os.path.join(staging, name)), exist_ok=True)
            with open(os.path.join(staging, name), "w") as handle:
                handle.write(text)


def _snapshot(folder) -> dict[str, str]:
    with atomic.verified_snapshot(folder) as root:
        return {name: pathlib.Path(root, name).read_text() for name in atomic._relative_files(root)
                if name != atomic.MANIFEST_NAME}


def test_folder_save_writes_a_manifest_of_hashes_and_replaces_the_previous_save(tmp_path):
    target = tmp_path / "model"
    _save(target, {"config.json": "one", "lora/adapter.bin": "lora one"})
    (target / "README.md").write_text("written by someone else")
    _save(target, {"config.json": "two", "weights": "w2"})
    manifest = json.loads((target / atomic.MANIFEST_NAME).read_text())
    assert sorted(manifest["files"]) == ["config.json", "weights"]
    for name, entry in manifest["files"].items():
        data = (target / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    # the previous save's own files are gone (lora/ with them), files no save wrote stay, no staging is left
    assert sorted(os.listdir(target)) == ["README.md", "config.json", atomic.MANIFEST_NAME, "weights"]
    assert _snapshot(target) == {"config.json": "two", "weights": "w2"}


def test_a_failed_folder_save_keeps_the_previous_one(tmp_path):
    target = tmp_path / "model"
    _save(target, {"config.json": "one"})
    with pytest.raises(RuntimeError, match="disk full"), atomic.atomic_folder(target) as staging:
        (tmp_path / "model" / os.path.basename(staging) / "config.json").write_text("half")
        raise RuntimeError("disk full")
    assert sorted(os.listdir(target)) == ["config.json", atomic.MANIFEST_NAME]
    assert _snapshot(target) == {"config.json": "one"}


def test_snapshot_waits_for_a_save_being_moved_in(tmp_path):
    target = tmp_path / "model"
    _save(target, {"a": "old a", "b": "old b"})
    _save(tmp_path / "next", {"a": "new a", "b": "new b"})
    (target / "a").write_text("new a")  # a second save halfway through its renames: new a, old b, old manifest

    def finish_the_save():
        time.sleep(0.3)
        os.replace(tmp_path / "next" / "b", target / "b")
        os.replace(tmp_path / "next" / atomic.MANIFEST_NAME, target / atomic.MANIFEST_NAME)

    writer = threading.Thread(target=finish_the_save)
    writer.start()
    try:
        assert _snapshot(target) == {"a": "new a", "b": "new b"}  # never {"a": "new a", "b": "old b"}
    finally:
        writer.join()


def test_a_torn_folder_is_an_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "LOAD_RETRY_SECONDS", 0.05)
    target = tmp_path / "model"
    _save(target, {"config.json": "one", "weights": "w1"})
    (target / "weights").write_text("w2")
    with pytest.raises(atomic.TornSaveError, match=r"model: weights differs from the manifest"):
        _snapshot(target)
    (target / "weights").unlink()
    with pytest.raises(atomic.TornSaveError, match=r"weights is missing"):
        _snapshot(target)
    (target / atomic.MANIFEST_NAME).unlink()  # no manifest: the files as they are (older saves, Hub downloads)
    assert _snapshot(target) == {"config.json": "one"}


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "a/../../b", ""])
def test_manifest_names_must_stay_inside_the_folder(tmp_path, name):
    (tmp_path / atomic.MANIFEST_NAME).write_text(json.dumps(
        {"format": atomic.MANIFEST_FORMAT, "files": {name: {"size": 1, "sha256": "0" * 64}}}))
    with pytest.raises(OSError, match="is malformed"):
        _snapshot(tmp_path)


def test_next_save_removes_staging_of_dead_processes_only(tmp_path):
    target = tmp_path / "model"
    _save(target, {"config.json": "one"})
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = subprocess.Popen(["sleep", "60"])
    host = atomic._host()
    names = {"dead": f"{atomic.STAGING_PREFIX}{host}-{dead.pid}-abc1",
             "live": f"{atomic.STAGING_PREFIX}{host}-{live.pid}-abc2",
             "other_host": f"{atomic.STAGING_PREFIX}elsewhere-{dead.pid}-abc3"}
    try:
        for name in names.values():
            (target / name).mkdir()
            (target / name / "model.safetensors").write_text("half written")
        assert _snapshot(target) == {"config.json": "one"}  # staging folders are no part of the save
        _save(target, {"config.json": "two"})
        assert sorted(os.listdir(target)) == sorted(["config.json", atomic.MANIFEST_NAME, names["live"],
                                                     names["other_host"]])
    finally:
        live.kill()
        live.wait()
