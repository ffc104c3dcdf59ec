"""Training GILL / MiniGPT-5 adapters with the Hugging Face ``Trainer`` (single or multi-process)."""

from .callbacks import RenormalizeImgEmbeddingsCallback, StopAtStepCallback
from .data import (CaptionImageDataset, GILLDataCollator, InterleavedDataCollator, SkippedExamplesCallback,
                   VISTTaskDataset, ldm_pixel_values, read_vist_stories)
from .distributed import gather_with_grad
from .interleaved import GILLForInterleavedTraining
from .ldm_loss import LatentDiffusionLoss
from .lora import apply_lora, load_lora_weights
from .mmdialog import Dialogue, DialogueTurn, MMDialogDataset, read_mmdialog
from .streaming import StreamingCaptionDataset
from .targets import DiffusionTextEncoder, TargetStore, precompute_targets
from .trainer import (GILLTrainer, configure_trainable, minigpt5_overrides, parameter_groups, set_training_fields,
                      train_gill)

__all__ = [
    "CaptionImageDataset", "Dialogue", "DialogueTurn", "DiffusionTextEncoder", "GILLDataCollator", "GILLForInterleavedTraining", "GILLTrainer",
    "InterleavedDataCollator", "LatentDiffusionLoss", "MMDialogDataset", "RenormalizeImgEmbeddingsCallback", "SkippedExamplesCallback",
    "StopAtStepCallback", "StreamingCaptionDataset",
    "TargetStore", "VISTTaskDataset", "apply_lora", "configure_trainable",
    "gather_with_grad", "ldm_pixel_values", "load_lora_weights", "minigpt5_overrides", "parameter_groups", "precompute_targets",
    "read_mmdialog", "read_vist_stories", "set_training_fields", "train_gill",
]
