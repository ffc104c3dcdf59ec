"""Trainer callbacks of the GILL recipe."""

from transformers import TrainerCallback

from .distributed import renormalize_img_embeddings


class RenormalizeImgEmbeddingsCallback(TrainerCallback):
    """After every optimizer step, rescale the [IMG] rows to the mean norm of the frozen vocabulary (as GILL; gathered
    under ZeRO-3)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is not None:
            renormalize_img_embeddings(model)


class StopAtStepCallback(TrainerCallback):
    """Save and stop after ``step`` optimizer steps (simulates an interruption; the schedule is unchanged)."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_save = True
            control.should_training_stop = True
