"""Reproducing the paper's evaluations for any GILL checkpoint: VIST / VisDial contextual image generation (CLIP
similarity, LPIPS), VIST contextual retrieval (Recall@k), the retrieve-vs-generate decision (macro-F1) and FID.
``gill-hf eval ...`` wraps these functions."""

from .contexts import (
                       VIST_SETTINGS,
                       ImageExample,
                       load_caption_set,
                       load_visdial,
                       load_vist,
                       visdial_context,
                       vist_context,
)
from .decision import evaluate_decision
from .fid import evaluate_fid
from .generators import DiffusionSettings, EvaluatedModels
from .image_cache import ImageStore
from .metrics import ClipImageEmbedder, FIDScorer, LPIPSScorer, recall_at_k
from .retrieval import evaluate_retrieval
from .visdial import evaluate_visdial
from .vist import evaluate_vist

__all__ = ["VIST_SETTINGS", "ClipImageEmbedder", "DiffusionSettings", "EvaluatedModels", "FIDScorer", "ImageExample",
           "ImageStore", "LPIPSScorer", "evaluate_decision", "evaluate_fid", "evaluate_retrieval", "evaluate_visdial",
           "evaluate_vist", "load_caption_set", "load_visdial", "load_vist", "recall_at_k", "visdial_context",
           "vist_context"]
