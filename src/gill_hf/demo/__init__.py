"""End-to-end demos on the tiny offline backbones (``gill-hf quickstart``)."""

from .quickstart import QuickstartSettings, run_quickstart

__all__ = ["QuickstartSettings", "run_quickstart"]
