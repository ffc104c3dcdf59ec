"""Writes that a crash or a concurrent reader never sees half done.

* Files: a temporary file beside the target, then a rename (:func:`atomic_path`, :func:`write_text_atomic`).
* Whole folders (:func:`atomic_folder`): a save is written into a staging folder ``.gill-save-<host>-<pid>-*``
  inside the target, its files are renamed in, and :data:`MANIFEST_NAME` (every file's size and sha256, and a save
  id) is renamed in last. A reader (:func:`verified_snapshot`) copies the files the manifest lists while checking
  their hashes, so what it loads is exactly one save, never a mix of two; while a save is being moved in it retries
  briefly, then raises :class:`TornSaveError`. Folders without a manifest (older saves, Hub downloads) load as
  they are. Staging folders of dead processes (a killed save) are removed by the next save into the folder.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
import uuid

MANIFEST_NAME = "gill_manifest.json"
MANIFEST_FORMAT = "gill_hf save manifest"
TEMPORARY_PREFIX = ".gill-"  # atomic_path's temporary files (a killed write may leave one)
STAGING_PREFIX = ".gill-save-"
LOAD_RETRY_SECONDS = 2.0  # how long a reader waits for a save that is being moved in before it gives up
_CHUNK = 1 << 20


class TornSaveError(OSError):
    """A folder's files do not match its manifest: it changed while loading, or a save into it was interrupted."""


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
    fd, tmp = tempfile.mkstemp(prefix=TEMPORARY_PREFIX, suffix=suffix, dir=directory)
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


# ---------------------------------------------------------------------------------------------- folder saves
def _host() -> str:
    return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _staging_owner(name: str) -> tuple[str, int] | None:
    """``.gill-save-<host>-<pid>-<random>`` -> (host, pid); None for other names."""
    match = re.fullmatch(re.escape(STAGING_PREFIX) + r"(.+)-(\d+)-[a-z0-9_]+", name)
    return (match[1], int(match[2])) if match else None


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there; never judge another process dead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_staging(folder: str | os.PathLike) -> list[str]:
    """Remove the staging folders in ``folder`` left by dead processes of this host; returns their names.

    Staging folders of live processes (a concurrent save) and of other hosts (liveness unknown) are kept."""
    folder, removed = os.fspath(folder), []
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        owner = _staging_owner(name)
        if owner is not None and owner[0] == _host() and not _process_alive(owner[1]):
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)
            removed.append(name)
    return removed


def _copy_hashing(src: str, dst: str | None) -> tuple[int, str]:
    """(size, sha256 hex) of ``src``, copying it to ``dst`` on the way unless None; one read of the file."""
    digest, size = hashlib.sha256(), 0
    with open(src, "rb") as source, (open(dst, "wb") if dst else contextlib.nullcontext()) as target:
        while chunk := source.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
            if target is not None:
                target.write(chunk)
    return size, digest.hexdigest()


def _relative_files(root: str) -> list[str]:
    """Every regular file under ``root``, as sorted ``/``-separated relative paths."""
    found = []
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            if os.path.isfile(path) and not os.path.islink(path):
                found.append(os.path.relpath(path, root).replace(os.sep, "/"))
    return sorted(found)


def _safe_relative(name: str) -> bool:
    parts = name.split("/")
    return bool(name) and not os.path.isabs(name) and "\\" not in name and all(p not in ("", ".", "..")
                                                                                for p in parts)


def read_json_record(path: str | os.PathLike, remedy: str):
    """The JSON value in ``path``, None when there is no such file; an ``OSError`` naming the file and ``remedy``
    when it is not UTF-8 JSON."""
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:
        raise OSError(f"{os.fspath(path)} is not valid JSON ({err}); {remedy}") from err


def read_manifest(folder: str | os.PathLike) -> dict | None:
    """The manifest of ``folder`` (``{"save_id", "files": {name: {"size", "sha256"}}}``), None when it has none.

    Raises ``OSError`` naming the file when it is unreadable or malformed (names must stay inside the folder)."""
    path = os.path.join(os.fspath(folder), MANIFEST_NAME)
    manifest = read_json_record(path, "delete it to load the folder's files unchecked")
    if manifest is None:
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or \
            not isinstance(manifest.get("files"), dict):
        raise OSError(f"{path} is not a gill_hf save manifest")
    for name, entry in manifest["files"].items():
        if not _safe_relative(name) or not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or \
                not isinstance(entry.get("sha256"), str):
            raise OSError(f"{path}: entry {name!r} is malformed (a relative path inside the folder with an integer "
                          "size and a sha256 string is expected)")
    return manifest


def _copy_verified(folder: str, manifest: dict, snapshot: str | None) -> str | None:
    """Copy (or, with ``snapshot`` None, only hash) the manifest's files; the first mismatch as text, else None."""
    for name, entry in sorted(manifest["files"].items()):
        dst = None
        if snapshot is not None:
            dst = os.path.join(snapshot, *name.split("/"))
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        try:
            size, sha = _copy_hashing(os.path.join(folder, *name.split("/")), dst)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return f"{name} is missing"
        if size != entry["size"]:
            return f"{name} has {size} bytes, the manifest says {entry['size']}"
        if sha != entry["sha256"]:
            return f"{name} differs from the manifest (sha256 {sha[:12]}... vs {entry['sha256'][:12]}...)"
    return None


def folder_problem(folder: str | os.PathLike) -> str | None:
    """Why ``folder``'s files do not match its manifest right now (None when they do, or when it has none)."""
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    return None if manifest is None else _copy_verified(folder, manifest, None)


@contextlib.contextmanager
def verified_snapshot(folder: str | os.PathLike):
    """Yield a private folder holding exactly the files of one complete save of ``folder`` (removed afterwards).

    Files are copied while their hashes are checked against the manifest; on a mismatch (a save being moved in)
    the manifest is re-read and the copy retried for :data:`LOAD_RETRY_SECONDS`, then :class:`TornSaveError` names
    the folder and the file. A folder without a manifest is yielded itself, unchecked."""
    folder = os.fspath(folder)
    manifest = read_manifest(folder)
    if manifest is None:
        yield folder
        return
    snapshot = tempfile.mkdtemp(prefix="gill-load-")
    try:
        deadline, delay = time.monotonic() + LOAD_RETRY_SECONDS, 0.005
        while (problem := _copy_verified(folder, manifest, snapshot)) is not None:
            if time.monotonic() > deadline:
                raise TornSaveError(
                    f"{folder}: {problem} ({MANIFEST_NAME}, save {manifest.get('save_id')}). The folder changed while "
                    f"loading (another process saving into it?), a save into it was interrupted, or a file was "
                    f"edited after saving; retried for {LOAD_RETRY_SECONDS:g}s. Save the model again, or delete "
                    f"{MANIFEST_NAME} to load the files as they are.")
            time.sleep(delay)
            delay = min(2 * delay, 0.1)
            shutil.rmtree(snapshot)
            os.makedirs(snapshot)
            manifest = read_manifest(folder)
            if manifest is None:  # the manifest was removed meanwhile: the files as they are
                yield folder
                return
        yield snapshot
    finally:
        shutil.rmtree(snapshot, ignore_errors=True)


@contextlib.contextmanager
def _folder_lock(folder: str):
    """An exclusive ``flock`` on the folder itself, so two saves never move their files in at the same time."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): concurrent saves are still detected by readers, not serialised
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _write_manifest(staging: str) -> tuple[list[str], str]:
    """Hash every staged file into ``staging/MANIFEST_NAME``; returns the staged names and the manifest's path."""
    names = _relative_files(staging)
    files = {}
    for name in names:
        size, sha = _copy_hashing(os.path.join(staging, *name.split("/")), None)
        files[name] = {"size": size, "sha256": sha}
    path = os.path.join(staging, MANIFEST_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"format": MANIFEST_FORMAT, "version": 1, "save_id": uuid.uuid4().hex, "files": files}, handle,
                  indent=1, sort_keys=True)
    return names, path


def _remove_leftovers(target: str, names) -> None:
    """Remove files of the previous save that the new one does not have, then their emptied folders."""
    for name in names:
        path = os.path.join(target, *name.split("/"))
        if os.path.isfile(path):
            os.unlink(path)
        parent = os.path.dirname(path)
        while parent != target and os.path.isdir(parent) and not os.listdir(parent):
            os.rmdir(parent)
            parent = os.path.dirname(parent)


def _commit(staging: str, target: str) -> None:
    """Move the staged files into ``target``, the manifest last; then drop the previous save's leftovers."""
    names, manifest_path = _write_manifest(staging)
    with _folder_lock(target):
        try:
            previous = read_manifest(target)
        except OSError:  # a damaged manifest is replaced below
            previous = None
        for name in names:
            dst = os.path.join(target, *name.split("/"))
            if os.path.isdir(dst) and not os.path.islink(dst):
                shutil.rmtree(dst)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(os.path.join(staging, *name.split("/")), dst)
        os.replace(manifest_path, os.path.join(target, MANIFEST_NAME))
        if previous is not None:
            _remove_leftovers(target, sorted(set(previous["files"]) - set(names)))


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike):
    """Yield an empty staging folder; when the block succeeds its files replace ``target``'s as one save.

    Readers that go through :func:`verified_snapshot` see the previous save or this one, never a mix. On error
    (or if the process dies) ``target`` keeps the previous save; the staging folder is removed, or, after a kill,
    by the next save. Files in ``target`` that no save wrote (checkpoints, a README) are left alone."""
    target = os.path.abspath(os.fspath(target))
    os.makedirs(target, exist_ok=True)
    remove_stale_staging(target)
    staging = tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{_host()}-{os.getpid()}-", dir=target)
    try:
        yield staging
        _commit(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
