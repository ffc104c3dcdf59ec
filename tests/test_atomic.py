import os

import pytest

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
