"""Files written so that a crash never leaves a half-written one: a temporary file beside the target, then a rename."""

import contextlib
import os
import tempfile


def _default_mode() -> int:
    """The permissions ``open()`` would give a new file (0o666 minus the umask); mkstemp's own are 0o600."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path in ``path``'s folder (created if missing); on success it is renamed onto ``path``
    with the usual file permissions, on error removed. ``suffix`` lets writers that go by extension pick a format."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gill-", suffix=suffix, dir=directory)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, _default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: str | os.PathLike, text: str):
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
