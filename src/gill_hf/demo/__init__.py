"""Demos on the tiny offline backbones: ``gill-hf quickstart`` and the web demo, ``gill-hf demo``
(:func:`build_demo`; Gradio is imported only when a demo is built)."""

from .quickstart import QuickstartSettings, run_quickstart
from .web import DemoSettings, build_demo

__all__ = ["DemoSettings", "QuickstartSettings", "build_demo", "run_quickstart"]
