"""A restricted unpickler for the original release's numpy pickles: only numpy array reconstruction is allowed.

The released ``cc3m_embeddings*.npy`` files are pickles of ``{"paths": [...], "embeddings": [...]}``. Plain
``pickle.load`` would execute whatever the file names; this loader refuses every global outside an allow-list.
"""

import io
import pickle

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
