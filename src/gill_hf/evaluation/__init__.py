"""Reproducing the paper's evaluations for any GILL checkpoint: VIST / VisDial contextual image generation (CLIP
similarity, LPIPS), VIST contextual retrieval (Recall@k), the retrieve-vs-generate decision (macro-F1) and FID;
and MiniGPT-5's: VIST final-step / all-steps images and narrations, CC3M, MMDialog (CLIP-I/T, IS, FID, BLEU,
ROUGE-L, METEOR, SBERT, MM-Relevance). ``gill-hf eval ...`` wraps these functions."""

from .contexts import (
                       VIST_SETTINGS,
                       ImageExample,
                       load_caption_set,
                       load_visdial,
                       load_vist,
                       visdial_context,
                       vist_context,
)
from .cc3m import evaluate_cc3m
from .decision import evaluate_decision
from .fid import evaluate_fid
from .generators import DiffusionSettings, EvaluatedModels
from .image_cache import ImageStore
from .image_quality import ImageMetrics, InceptionScorer
from .metrics import ClipImageEmbedder, FIDScorer, LPIPSScorer, recall_at_k
from .minigpt5_vist import evaluate_minigpt5_vist
from .mmdialog import evaluate_mmdialog
from .retrieval import evaluate_retrieval
from .text_metrics import SentenceSimilarity, TextScorers
from .visdial import evaluate_visdial
from .vist import evaluate_vist

__all__ = ["VIST_SETTINGS", "ClipImageEmbedder", "DiffusionSettings", "EvaluatedModels", "FIDScorer", "ImageExample",
           "ImageMetrics", "ImageStore", "InceptionScorer", "LPIPSScorer", "SentenceSimilarity", "TextScorers",
           "evaluate_cc3m", "evaluate_decision", "evaluate_fid", "evaluate_minigpt5_vist", "evaluate_mmdialog",
           "evaluate_retrieval", "evaluate_visdial", "evaluate_vist", "load_caption_set", "load_visdial", "load_vist",
           "recall_at_k", "visdial_context", "vist_context"]
