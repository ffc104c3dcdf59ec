"""The preamble of a child interpreter in which ``import gill_hf`` fails, as for a Hub user without the library."""

BLOCK_GILL = """
import importlib.abc, sys

class BlockGill(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "gill_hf":
            raise ImportError("gill_hf is blocked in this process")

sys.meta_path.insert(0, BlockGill())
"""
