"""Sub-commands of ``gill-hf``; each module exposes ``register(subparsers)``.

The checks below run before any model loads. A bad value raises :class:`UsageError`, which the command line
reports as ``gill-hf: error: ...`` with exit status 2 (argparse's own usage errors exit 2 too).
"""

import argparse
import os


class UsageError(ValueError):
    """A bad command-line value, config field or missing input path (exit status 2)."""


def looks_local(value: str) -> bool:
    """Whether ``value`` names a local path rather than a Hub repo id (``name`` or ``owner/name``): it starts with
    ``.``, ``/`` or ``~``, has more than one ``/``, holds the OS separator, or its first part exists here."""
    if value.startswith((".", "/", "~")) or (os.sep != "/" and os.sep in value):
        return True
    parts = value.split("/")
    return len(parts) > 2 or os.path.exists(parts[0])


def existing_path(value: str, what: str, kind: str | None = None) -> str:
    """``value`` (``~`` expanded) if it exists, as a file / folder when ``kind`` is "file" / "folder"."""
    path = os.path.expanduser(os.fspath(value))
    if not os.path.exists(path):
        raise UsageError(f"{what}: no such file or folder: {value}")
    if kind == "file" and not os.path.isfile(path):
        raise UsageError(f"{what}: {value} is a folder, expected a file")
    if kind == "folder" and not os.path.isdir(path):
        raise UsageError(f"{what}: {value} is a file, expected a folder")
    return path


def model_source(value: str, what: str) -> str:
    """A Hub repo id unchanged, or a local-looking path (see :func:`looks_local`) that must be an existing folder."""
    return existing_path(value, what, "folder") if looks_local(value) else value


def output_path(value: str, what: str, kind: str) -> str:
    """An output ``kind`` ("file" / "folder") that may be created: ``value`` (``~`` expanded) must not be an existing
    path of the other kind, nor lie below an existing file."""
    path = os.path.expanduser(os.fspath(value))
    if kind == "file" and os.path.isdir(path):
        raise UsageError(f"{what}: {value} is a folder, expected a file to write")
    if kind == "folder" and os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{what}: {value} is a file, expected a folder")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UsageError(f"{what}: cannot create {value}: {parent} is a file")
    return path


def found_shards(specs, what: str) -> list[str]:
    """Webdataset shard files from brace patterns, folders or files (``~`` expanded); a ``UsageError`` naming ``what``
    (the option or config field) when one is missing or not a tar, or webdataset is not installed."""
    from ..training.streaming import find_shards

    try:
        return find_shards(os.path.expanduser(spec) for spec in ([specs] if isinstance(specs, str) else specs))
    except (ValueError, ImportError) as error:
        raise UsageError(f"{what}: {error}") from None


def torch_device(text: str) -> str:
    """An argparse ``type``: a torch device name (cpu, cuda, cuda:1, mps ...)."""
    import torch

    try:
        torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (cpu, cuda, cuda:1 ...)") from None
    return text


def bounded(kind: type, minimum=None, maximum=None, open_min: bool = False):
    """An argparse ``type``: ``kind(text)`` within ``[minimum, maximum]`` (either side optional; ``open_min``:
    above ``minimum``)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, "
                                             f"got {text!r}") from None
        low = minimum is not None and (value <= minimum if open_min else value < minimum)
        if low or (maximum is not None and value > maximum):
            lower = f"> {minimum}" if open_min else f">= {minimum}"
            bound = lower if maximum is None else f"<= {maximum}" if minimum is None else \
                f"{lower} and <= {maximum}"
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its own messages
    return parse
