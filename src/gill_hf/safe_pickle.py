"""Restricted unpicklers: nothing a file names is ever imported or called outside an allow-list.

* :func:`safe_load`: the original GILL release's ``cc3m_embeddings*.npy`` pickles (``{"paths": [...],
  "embeddings": [...]}``): numpy arrays, dicts, lists and scalars; any other global is refused.
* :func:`load_tensor_checkpoint`: ``torch.save`` zip checkpoints such as PyTorch Lightning ``.ckpt`` files, which
  hold tensors beside objects of the training code (``hyper_parameters`` dataclasses, callback states...). Tensors
  and plain containers are rebuilt; every other global becomes an inert :class:`SkippedObject` (recorded by name,
  never imported, its arguments discarded), so a file cannot run code, and the caller decides whether a skipped
  entry matters.
"""

import io
import os
import pickle
import types
import zipfile

ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "bytes"), ("builtins", "bytearray"), ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: only numpy arrays are allowed")
        return super().find_class(module, name)


def safe_load(source) -> object:
    """Unpickle ``source`` (a path, bytes or binary file) allowing numpy arrays, dicts, lists and scalars only."""
    if isinstance(source, (bytes, bytearray)):
        return RestrictedUnpickler(io.BytesIO(source)).load()
    if hasattr(source, "read"):
        return RestrictedUnpickler(source).load()
    with open(source, "rb") as handle:
        return RestrictedUnpickler(handle).load()


# torch's own tensor rebuild functions (storages are resolved by torch.load itself) and plain containers.
TENSOR_GLOBALS = {
    ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
    ("collections", "OrderedDict"), ("torch", "Size"), ("_codecs", "encode"),
}


class SkippedObject:
    """What a global outside the allow-list (a class, a function) and anything built from it unpickle to. The
    class :class:`TensorUnpickler` returns for such a global is a fresh subclass whose ``skipped_name`` is the
    ``module.qualname`` the file named; its arguments, items and state are dropped and nothing of it runs."""

    skipped_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):  # dict subclasses (e.g. Lightning's AttributeDict) are filled item by item
        pass

    def append(self, value):  # list subclasses
        pass

    def extend(self, values):
        pass

    def __repr__(self) -> str:
        return f"<skipped {self.skipped_name}>"


class TensorUnpickler(pickle.Unpickler):
    """Rebuilds tensors and plain containers; any other global becomes a :class:`SkippedObject` subclass, and its
    name is added to ``skipped`` (a set shared by the unpicklers of one :func:`load_tensor_checkpoint` call)."""

    skipped: set[str] = set()

    def find_class(self, module: str, name: str):
        if (module, name) in TENSOR_GLOBALS:
            return super().find_class(module, name)
        full = f"{module}.{name}"
        self.skipped.add(full)
        return type("Skipped", (SkippedObject,), {"skipped_name": full})


def load_tensor_checkpoint(path: str | os.PathLike) -> tuple[object, list[str]]:
    """``torch.save`` zip checkpoint -> (its object with tensors on CPU, sorted names of the skipped globals).

    Nothing the file names is imported or called beyond :data:`TENSOR_GLOBALS`; objects of other classes come
    back as :class:`SkippedObject`. Files that are not torch zip checkpoints (legacy ``torch.save`` format,
    TorchScript archives, anything else) raise ``ValueError``.
    """
    import torch

    path = os.fspath(path)
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not a torch zip checkpoint (torch.save >= 1.6 / PyTorch Lightning .ckpt)")
    with zipfile.ZipFile(path) as archive:  # torch.load hands TorchScript archives to torch.jit.load, which runs
        if any(name.rpartition("/")[2] == "constants.pkl" for name in archive.namelist()):  # their code
            raise ValueError(f"{path} is a TorchScript archive (it holds constants.pkl), not a torch.save "
                             f"checkpoint; loading it would run its code")
    skipped: set[str] = set()
    module = types.SimpleNamespace(Unpickler=type("Unpickler", (TensorUnpickler,), {"skipped": skipped}),
                                   load=None, __name__="gill_hf.safe_pickle")
    try:
        data = torch.load(path, map_location="cpu", pickle_module=module, weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, AttributeError, TypeError) as err:
        raise ValueError(f"{path} cannot be read as a torch checkpoint: {type(err).__name__}: {err}") from err
    return data, sorted(skipped)
