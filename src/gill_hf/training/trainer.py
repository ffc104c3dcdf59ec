"""The GILL training recipe on the HF ``Trainer``: parameter groups, trainable sets, LDM loss, resume with LoRA.

``train_gill(model, train_dataset, output_dir, **training_args)`` builds and returns a ready :class:`GILLTrainer`
(call ``.train()``); the same script scales to many processes with ``accelerate launch`` / ``torchrun``.
"""

import contextlib
import dataclasses
import json
import os
import re
from collections import defaultdict

import torch
from torch.utils.data import ConcatDataset
from transformers import Trainer, TrainingArguments
from transformers.trainer import SCHEDULER_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, sort_checkpoints
from transformers.utils import logging

from ..atomic import folder_problem
from ..loading import unknown_kwargs_error
from .callbacks import RenormalizeImgEmbeddingsCallback
from .data import (GILLDataCollator, InterleavedDataCollator, SkipCounter, SkippedExamplesCallback, VISTTaskDataset,
                   as_caption_dataset)
from .distributed import (DEEPSPEED_NO_RESUME, gathered, gather_with_grad, prepare_for_zero3,
                          replicate_adapter_under_fsdp)
from .lora import load_lora_weights
from .mmdialog import MMDialogDataset
from .streaming import StreamingCaptionDataset, as_training_dataset, streaming_dataloader

logger = logging.get_logger(__name__)
TRAINER_STATE_NAME = "trainer_state.json"  # the last file transformers' Trainer writes into a checkpoint
LOSS_FIELDS = ("caption_loss", "img_token_loss", "gen_loss", "ret_loss")
NO_DECAY_KEYS = ("logit_scale", "queries", "img_embeddings", "img_output_embeddings")
GILL_TRAINING_DEFAULTS = dict(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.01,
                              max_grad_norm=1.0, lr_scheduler_type="constant_with_warmup", warmup_steps=0,
                              remove_unused_columns=False, report_to="none", save_strategy="no",
                              logging_steps=10)


def uses_weight_decay(name: str, param: torch.Tensor) -> bool:
    """No decay on 1-D tensors (norms, biases, logit scale) and on the queries and [IMG] rows."""
    return param.ndim >= 2 and not any(key in name for key in NO_DECAY_KEYS)


def parameter_groups(model, weight_decay: float, mapper_lr_mult: float = 1.0, learning_rate: float | None = None
                     ) -> list[dict]:
    """Trainable parameters split by (weight decay?, mapper?); mapper groups get ``lr * mapper_lr_mult``."""
    groups: dict[tuple[bool, bool], list] = defaultdict(list)
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups[(uses_weight_decay(name, param), ".mapper." in f".{name}")].append(param)
    out = []
    for (decay, is_mapper), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if is_mapper and mapper_lr_mult != 1.0:
            if learning_rate is None:
                raise ValueError("mapper_lr_mult needs learning_rate")
            group["lr"] = learning_rate * mapper_lr_mult
        out.append(group)
    return out


def checkpoint_problem(checkpoint_dir: str | os.PathLike) -> str | None:
    """Why ``checkpoint_dir`` cannot be resumed from, or None when it is complete.

    Complete means: ``trainer_state.json`` (which the Trainer writes after the model, optimizer, scheduler and RNG
    states) parses and records the folder's step, and the GILL save in it matches its manifest. A run killed while
    writing a checkpoint leaves one that fails this."""
    path = os.fspath(checkpoint_dir)
    state_file = os.path.join(path, TRAINER_STATE_NAME)
    if not os.path.isfile(state_file):
        return f"{TRAINER_STATE_NAME} is missing"
    try:
        with open(state_file, encoding="utf-8") as handle:
            step = json.load(handle).get("global_step")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return f"{TRAINER_STATE_NAME} is truncated or not JSON"
    match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", os.path.basename(os.path.normpath(path)))
    if match and step != int(match[1]):
        return f"{TRAINER_STATE_NAME} records step {step}, not {match[1]}"
    try:
        problem = folder_problem(path)
    except OSError as err:  # an unreadable manifest
        return str(err)
    return f"its model files do not match their manifest: {problem}" if problem else None


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest ``checkpoint-<step>`` folder of ``output_dir`` that :func:`checkpoint_problem` accepts (newer
    incomplete ones are skipped with a log line); None when there are no checkpoints. Raises ``ValueError``
    listing the reasons when every checkpoint is incomplete."""
    found = sort_checkpoints(os.fspath(output_dir)) if os.path.isdir(output_dir) else []
    skipped = []
    for path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            for bad, why in skipped:
                logger.warning(f"not resuming from {bad} (incomplete: {why}); using {path}")
            return path
        skipped.append((path, problem))
    if skipped:
        reasons = "; ".join(f"{p}: {why}" for p, why in skipped)
        raise ValueError(f"no complete checkpoint in {output_dir} to resume from (a run killed while saving leaves "
                         f"incomplete ones): {reasons}")
    return None


def configure_trainable(model) -> list[str]:
    """Freeze adapter parts the configured stage does not train; keep trainables in fp32 (master weights).

    Stage "align" trains every adapter part whose loss is on (W_cap only with l_c); "interleaved" (MiniGPT-5 stage 2) freezes the
    retrieval heads and the mapper's input projection and queries. The decision head stays frozen (it is fit
    separately, see ``decision_training``). Returns the trainable parameter names.
    """
    cfg, adapter = model.config, model.adapter
    frozen = [adapter.decision_head]
    if cfg.training_stage == "align" and cfg.caption_loss_weight == 0:
        frozen.append(adapter.w_cap)
    if cfg.ret_loss_weight == 0 or cfg.training_stage == "interleaved":
        frozen += [adapter.w_t2i, adapter.w_i2t]
        adapter.logit_scale.requires_grad_(False)
    if cfg.training_stage == "interleaved":
        for name in ("in_proj", "queries"):
            part = getattr(adapter.mapper, name, None)
            if isinstance(part, torch.nn.Parameter):
                part.requires_grad_(False)
            elif part is not None:
                frozen.append(part)
    for module in frozen:
        module.requires_grad_(False)
    names = []
    for name, param in model.named_parameters():
        if param.requires_grad:
            if param.dtype != torch.float32:
                param.data = param.data.float()
            names.append(name)
    return names


class GILLTrainer(Trainer):
    """``Trainer`` with GILL's parameter groups, per-loss logging, the optional LDM loss and LoRA-aware resume.

    Args:
        ldm_loss: a :class:`~gill_hf.training.ldm_loss.LatentDiffusionLoss`, weighted by ``config.ldm_loss_weight``
            and applied to ``outputs.gen_embeds`` against the batch's ``ldm_pixel_values``.
        mapper_lr_mult: learning-rate multiplier of the mapper (MiniGPT-5 stage 1: 10).
    """

    def __init__(self, *args, ldm_loss=None, mapper_lr_mult: float = 1.0, eval_data_collator=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_deepspeed_enabled:  # ZeRO-3 partitions the frozen backbones; the adapter trains
            prepare_for_zero3(self.model, self.accelerator.state.deepspeed_plugin.deepspeed_config, self.args)
        self.ldm_loss, self.mapper_lr_mult = ldm_loss, mapper_lr_mult
        self.eval_data_collator = eval_data_collator  # eval batches (e.g. with the eval split's targets)
        self._loss_parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._eval_loss_parts: dict[str, list[torch.Tensor]] = defaultdict(list)
        if ldm_loss is not None:
            ldm_loss.to(self.args.device)
        if self.is_fsdp_enabled:  # FSDP2 shards the frozen backbones; the adapter stays whole (DDP-like)
            replicate_adapter_under_fsdp(self.model, self.accelerator.state.fsdp_plugin,
                                         lambda: self.accelerator.sync_gradients)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            model = self.model if model is None else model
            groups = parameter_groups(model, self.args.weight_decay, self.mapper_lr_mult, self.args.learning_rate)
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's loss (Eq. 5, or stage 2's) plus ``ldm_loss_weight`` x the LDM loss; a per-batch mean, except
        stage 2's text term: its share of the accumulated batch's token mean (:meth:`_text_loss_scale`)."""
        ldm_pixels = inputs.pop("ldm_pixel_values", None)
        outputs = model(**inputs, gill_objective=True)
        text_scale = self._text_loss_scale(inputs, num_items_in_batch)
        loss = outputs.loss + (text_scale - 1) * self.model.config.img_token_loss_weight * outputs.img_token_loss
        parts = self._loss_parts if model.training else self._eval_loss_parts
        for name in LOSS_FIELDS:
            value = getattr(outputs, name)
            if value is not None:
                parts[name].append(value.detach().float() * (text_scale if name == "img_token_loss" else 1))
        weight = self.model.config.ldm_loss_weight
        if self.ldm_loss is not None and weight > 0 and ldm_pixels is not None and outputs.gen_embeds is not None:
            pooled = self.model.gen_pooled_embeddings(outputs.gen_embeds) if self.model.config.gen_pooled_dim \
                else None  # layouts with a pooled vector (SDXL)
            ldm = self.ldm_loss(outputs.gen_embeds, ldm_pixels, pooled)
            loss = loss + weight * ldm
            parts["ldm_loss"].append(ldm.detach().float())
        return (loss, outputs) if return_outputs else loss

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device):
        """Supervised tokens (shifted ``labels`` != -100) of the whole accumulated batch of stage-2 batches, as
        transformers counts them for causal LMs (every rank's under ``average_tokens_across_devices``); None for
        batches without ``labels``."""
        if not batch_samples or "labels" not in batch_samples[0]:
            return None
        count = sum((batch["labels"][..., 1:] != -100).sum() for batch in batch_samples).to(device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def _text_loss_scale(self, inputs, num_items_in_batch) -> torch.Tensor | float:
        """Factor that turns a micro-batch's token-mean text loss into its share of the accumulated batch's token
        mean (``training_step`` divides every loss by the accumulation steps; DDP averages the ranks), so
        accumulation and data parallelism weigh tokens like one large batch. 1 for batches without ``labels``."""
        if num_items_in_batch is None or "labels" not in inputs:
            return 1.0
        local = (inputs["labels"][..., 1:] != -100).sum()
        ranks = self.args.world_size if self.args.average_tokens_across_devices else 1
        return local * self.current_gradient_accumulation_steps * ranks / num_items_in_batch.clamp(min=1)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the training objective's loss on the batch (GILL batches carry no ``labels`` the stock
        step would look for); no logits are gathered."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluation_loop(self, *args, **kwargs):
        """Adds ``<prefix>_<term>``: the mean of every loss term over the split (this process's batches)."""
        self._eval_loss_parts.clear()
        output = super().evaluation_loop(*args, **kwargs)
        prefix = kwargs.get("metric_key_prefix", args[4] if len(args) > 4 else "eval")
        for name, values in self._eval_loss_parts.items():
            output.metrics[f"{prefix}_{name}"] = round(torch.stack(values).mean().item(), 6)
        self._eval_loss_parts.clear()
        return output

    def get_train_dataloader(self):
        """A stream (:class:`StreamingCaptionDataset`) reads only this process's part: its loader is not re-sharded."""
        if isinstance(self.train_dataset, StreamingCaptionDataset):
            return streaming_dataloader(self.train_dataset, self.args, self.data_collator, self._train_batch_size)
        return super().get_train_dataloader()

    def _init_training_state(self, *args, **kwargs):
        """A resumed stream skips the trained batches' raw samples itself (no image decoded) rather than the
        Trainer collating and dropping those batches."""
        epochs_trained, batches_trained = super()._init_training_state(*args, **kwargs)
        if isinstance(self.train_dataset, StreamingCaptionDataset):
            self.train_dataset.start = batches_trained * self._train_batch_size
            return epochs_trained, 0
        return epochs_trained, batches_trained

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def push_to_hub(self, commit_message: str | None = "End of training", blocking: bool = True,
                    token: str | None = None, revision: str | None = None, private: bool | None = None, **kwargs):
        """Save, then upload through :func:`gill_hf.hub.push_to_hub` to ``args.hub_model_id`` (default: the output
        folder's name): adapter, config, processor, LoRA adapter and the gill_hf model card with these
        ``TrainingArguments`` as hyperparameters. ``kwargs``: the card fields of ``gill_hf.hub.push_to_hub``
        (``datasets`` (or transformers' ``dataset``), ``eval_results``, ``license``, ``license_name``, ``tags``,
        ``retrieval_index``) and its ``model_card`` / ``remote_code`` switches. The upload is synchronous:
        ``blocking=False`` is an error."""
        from ..hub import push_to_hub

        if not blocking:
            raise ValueError("GILLTrainer.push_to_hub uploads synchronously; blocking=False is not supported")
        if "dataset" in kwargs and "datasets" not in kwargs:
            dataset = kwargs.pop("dataset")
            kwargs["datasets"] = [dataset] if isinstance(dataset, str) else list(dataset)
        allowed = ("datasets", "eval_results", "license", "license_name", "tags", "retrieval_index",
                   "commit_description", "create_pr", "max_shard_size", "model_card", "remote_code")
        unknown = set(kwargs) - set(allowed)
        if unknown:
            raise unknown_kwargs_error("GILLTrainer.push_to_hub", unknown, {*allowed, "dataset"})
        token = token if token is not None else self.args.hub_token
        if self.hub_model_id is None:
            self.init_hf_repo(token=token, private=private)
        self.save_model(_internal_call=True)
        if not self.is_world_process_zero():
            return None
        self._finish_current_push()
        return push_to_hub(self.model, self.hub_model_id, revision=revision or self.args.hub_revision,
                           commit_message=commit_message, token=token,
                           private=private if private is not None else self.args.hub_private_repo,
                           hyperparameters=self.args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the mean of every loss term since the last log (this process's batches)."""
        if "loss" in logs:
            for name, values in self._loss_parts.items():
                logs[name] = round(torch.stack(values).mean().item(), 6)
            self._loss_parts.clear()
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None):
        """``Trainer.train`` that never resumes from an incomplete checkpoint (a run killed mid-write):
        ``resume_from_checkpoint=True`` takes the newest complete one in ``args.output_dir``; a path to an
        incomplete one is a ``ValueError`` saying what is missing (see :func:`checkpoint_problem`). Under
        DeepSpeed, resuming is a ``ValueError`` (not supported yet)."""
        if self.is_deepspeed_enabled and resume_from_checkpoint not in (None, False):
            raise ValueError(f"resume_from_checkpoint={resume_from_checkpoint!r}: {DEEPSPEED_NO_RESUME}")
        return super().train(resume_from_checkpoint=self._complete_checkpoint(resume_from_checkpoint), trial=trial,
                             ignore_keys_for_eval=ignore_keys_for_eval)

    def _complete_checkpoint(self, resume_from_checkpoint):
        if resume_from_checkpoint is True:
            found = last_complete_checkpoint(self.args.output_dir)
            if found is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            return found
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            path = os.fspath(resume_from_checkpoint)
            if not os.path.isdir(path):
                raise FileNotFoundError(f"resume_from_checkpoint={path!r}: no such folder")
            problem = checkpoint_problem(path)
            if problem is not None:
                raise ValueError(f"checkpoint {path} is incomplete ({problem}); it was probably being written when "
                                 "its run was killed. Resume from an earlier checkpoint, or pass "
                                 "resume_from_checkpoint=True for the newest complete one")
            return path
        return resume_from_checkpoint

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with self._adapter_as_plain_model():
            super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_lora_weights(self.model if model is None else model, resume_from_checkpoint)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the adapter folder (``save_pretrained``); under FSDP too: the adapter is whole on every process,
        so nothing is gathered and the frozen LLM's full or sharded weights are never written. Under ZeRO-3 the
        adapter alone is gathered (every process takes part)."""
        if not (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            return super().save_model(output_dir, _internal_call)
        model = self.accelerator.unwrap_model(self.model)
        with gathered(model.adapter.parameters()):
            state_dict = {k: v.detach().clone() for k, v in model.adapter_state_dict().items()}
        self._save(output_dir, state_dict=state_dict)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if self.is_deepspeed_enabled:  # the engine's checkpoint: adapter partitions and optimizer state only
            self.model_wrapped.save_checkpoint(output_dir, exclude_frozen_parameters=True)
            from accelerate.utils import DeepSpeedSchedulerWrapper

            if self.args.should_save and not isinstance(self.lr_scheduler, DeepSpeedSchedulerWrapper):
                torch.save(self.lr_scheduler.state_dict(), os.path.join(output_dir, SCHEDULER_NAME))
            return
        with self._adapter_as_plain_model():  # the optimizer holds only the replicated adapter
            super()._save_optimizer_and_scheduler(output_dir)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with self._adapter_as_plain_model():
            super()._load_optimizer_and_scheduler(checkpoint)

    @contextlib.contextmanager
    def _adapter_as_plain_model(self):
        """Under FSDP, run the Trainer's checkpoint code as without it: GILL's optimizer and checkpoint weights
        are the replicated adapter's plain tensors (transformers' FSDP paths would save the sharded LLM)."""
        fsdp, self.is_fsdp_enabled = self.is_fsdp_enabled, False
        try:
            yield
        finally:
            self.is_fsdp_enabled = fsdp


TRAIN_GILL_OPTIONS = ("data_collator", "targets", "ldm_loss", "max_length", "activation_checkpointing",
                      "mapper_lr_mult", "callbacks", "eval_dataset", "eval_targets", "columns")


def training_arguments(output_dir: str, **training_args) -> TrainingArguments:
    """``TrainingArguments`` with GILL's defaults (``GILL_TRAINING_DEFAULTS``; bf16 autocast where CUDA supports it);
    a name that is no field is an error naming the closest field."""
    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    unknown = set(training_args) - fields
    if unknown:
        raise unknown_kwargs_error("train_gill", unknown, fields | set(TRAIN_GILL_OPTIONS))
    for old, new in (("gradient_checkpointing", "activation_checkpointing"),
                     ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")):
        if old in training_args:  # transformers' deprecated names: the same switch
            training_args.setdefault(new, training_args.pop(old))
    args = {**GILL_TRAINING_DEFAULTS, "output_dir": output_dir,
            "bf16": torch.cuda.is_available() and torch.cuda.is_bf16_supported() and not training_args.get("fp16"),
            "dataloader_pin_memory": torch.cuda.is_available(), **training_args}
    if args.get("use_cpu") and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        args.setdefault("ddp_backend", "gloo")  # multi-process CPU runs (torchrun / accelerate launch --cpu)
    if args.get("remove_unused_columns"):
        raise ValueError("remove_unused_columns must stay False: the collator builds the model inputs")
    return TrainingArguments(**args)


def train_gill(model, train_dataset, output_dir: str, *, data_collator=None, targets=None, ldm_loss=None,
               max_length: int = 32, activation_checkpointing: bool = False, mapper_lr_mult: float = 1.0,
               callbacks=(), eval_dataset=None, eval_targets=None, columns: dict[str, str] | None = None,
               **training_args) -> GILLTrainer:
    """A :class:`GILLTrainer` for ``model`` on ``train_dataset`` (call ``.train()`` on it).

    Args:
        train_dataset: a ``CaptionImageDataset`` (stage 1) or ``VISTTaskDataset`` (stage 2; the model must take
            ``labels``, e.g. ``GILLForInterleavedTraining``), each with its default collator; a ``datasets.Dataset``
            or ``IterableDataset`` of image-caption pairs (see ``columns``; an ``IterableDataset`` is read as a
            :class:`StreamingCaptionDataset`, as are webdataset shards, which need ``max_steps``); or any dataset
            matching ``data_collator``.
        eval_dataset: the same kinds (or a dict of them); ``trainer.evaluate()`` and ``eval_strategy`` report
            ``eval_loss`` and every loss term as ``eval_<term>`` (training logs carry the bare names).
        targets / eval_targets: ``TargetStore`` s with the captions' text-encoder outputs of the train / eval split
            (enable l_g and CFG targets; a fixed-order dataset's store is indexed by example, so each split needs
            its own; a stream's examples find their rows by caption, in a store with caption keys).
        columns: for ``datasets`` inputs, ``{"caption": <text column>, "image": <image column>}``; defaults to
            ``caption`` or ``text``, and ``image``.
        ldm_loss: the MiniGPT-5 latent-diffusion loss (needs ``config.ldm_loss_weight > 0``).
        activation_checkpointing: checkpoint the frozen LLM's layers (less memory, one extra LLM forward); the
            same as ``TrainingArguments``' ``activation_checkpointing`` / ``gradient_checkpointing``.
        training_args: any ``TrainingArguments`` field (a misspelt one is an error naming the closest field);
            GILL's optimiser defaults (``GILL_TRAINING_DEFAULTS``) fill the rest. bf16 autocast is on by default
            where CUDA supports it (``fp16=True`` switches it off); trainables (adapter, LoRA) stay fp32 masters
            under ``bf16`` / ``fp16`` whatever dtype the backbones are in.
    """
    args = training_arguments(output_dir, **training_args)
    train_dataset = as_training_dataset(train_dataset, columns)
    stream = isinstance(train_dataset, StreamingCaptionDataset)  # its examples find their targets by caption
    if isinstance(eval_dataset, dict):
        eval_dataset = {name: as_caption_dataset(ds, columns) for name, ds in eval_dataset.items()}
    elif eval_dataset is not None:
        eval_dataset = as_caption_dataset(eval_dataset, columns)
    interleaved = _is_stage2(train_dataset)
    if targets is not None and interleaved:
        raise ValueError("stage 2 (VIST / MMDialog examples) has no l_g: it takes no targets")
    if data_collator is not None and targets is not None and getattr(data_collator, "targets", None) is not targets:
        raise ValueError("targets= feeds train_gill's own collator; a data_collator of your own must hold the store "
                         "itself (e.g. GILLDataCollator(processor, targets=store)), or it would train without it")
    if stream and getattr(data_collator, "targets", None) is not None and \
            getattr(data_collator, "targets_by", "index") != "caption":
        raise ValueError("a stream's examples have no fixed position: its collator must find targets by caption "
                         "(GILLDataCollator(..., targets=store, targets_by='caption'))")
    if data_collator is not None and eval_targets is not None:
        raise ValueError("eval_targets= feeds train_gill's own eval collator; with a data_collator of your own, "
                         "evaluate with a collator holding the eval store")
    if targets is not None and hasattr(train_dataset, "captions"):
        targets.check_captions(train_dataset.captions)
    if eval_targets is not None:
        if eval_dataset is None or isinstance(eval_dataset, dict):
            raise ValueError("eval_targets needs one eval_dataset (a dict of splits takes a data_collator instead)")
        if _is_stage2(eval_dataset):
            raise ValueError("stage 2 (VIST / MMDialog eval examples) has no l_g: it takes no eval_targets")
        if hasattr(eval_dataset, "captions"):
            eval_targets.check_captions(eval_dataset.captions)
    if model.config.ldm_loss_weight > 0 and ldm_loss is None:
        raise ValueError("config.ldm_loss_weight > 0 needs ldm_loss=LatentDiffusionLoss.from_pretrained(...)")
    if model.config.cfg_dropout_prob > 0 and targets is None and model.config.training_stage == "align":
        raise ValueError("cfg_dropout_prob > 0 needs a target store (its null embedding is the dropped target)")
    configure_trainable(model)
    if activation_checkpointing:
        model.activation_checkpointing_enable()
    model.contrastive_gather = gather_with_grad  # identity in a single process
    ldm_size = ldm_loss.image_size if ldm_loss is not None else None
    eval_collator = None
    if data_collator is None and interleaved:
        data_collator = InterleavedDataCollator(model.processor, ldm_image_size=ldm_size)
    elif data_collator is None:
        data_collator = GILLDataCollator(model.processor, max_length=max_length, targets=targets,
                                         ldm_image_size=ldm_size, targets_by="caption" if stream else "index")
        if eval_dataset is not None and not _is_stage2(eval_dataset) and (
                targets is not None or eval_targets is not None):
            # the train store indexes train examples: eval batches get their own store, or no l_g; a streamed eval
            # split has no fixed positions, so its rows are found by caption
            eval_collator = GILLDataCollator(
                model.processor, max_length=max_length, targets=eval_targets, ldm_image_size=ldm_size,
                targets_by="index" if eval_targets is None or hasattr(eval_dataset, "captions") else "caption")
    summary = [SkippedExamplesCallback(data_collator)] if isinstance(data_collator, SkipCounter) else []
    return GILLTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                       data_collator=data_collator, eval_data_collator=eval_collator, ldm_loss=ldm_loss,
                       mapper_lr_mult=mapper_lr_mult,
                       callbacks=[RenormalizeImgEmbeddingsCallback(), *summary, *callbacks])


def _is_stage2(dataset) -> bool:
    """Whether ``dataset`` holds stage-2 examples (VIST tasks, MMDialog turns, or a concatenation of them)."""
    if isinstance(dataset, ConcatDataset):
        return bool(dataset.datasets) and all(_is_stage2(part) for part in dataset.datasets)
    return isinstance(dataset, (VISTTaskDataset, MMDialogDataset))


TRAINING_FIELDS = ("training_stage", "caption_loss_weight", "img_token_loss_weight", "gen_loss_weight", "ret_loss_weight",
                   "ldm_loss_weight", "ldm_snr_gamma", "cfg_dropout_prob", "pack_prob", "gen_loss_type",
                   "lp_supervise_caption", "use_lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
                   "decision_threshold")


def set_training_fields(config, **values) -> None:
    """Change objective / stage fields of a built model's config (e.g. stage 1 -> 2); architecture fields of a
    built model cannot change, and naming one raises."""
    fixed = {k: v for k, v in values.items() if k not in TRAINING_FIELDS and getattr(config, k, object()) != v}
    if fixed:
        raise ValueError(f"cannot change {sorted(fixed)} on a built model (architecture fields); only "
                         f"{TRAINING_FIELDS} can be set after loading")
    for key, value in values.items():
        setattr(config, key, value)
    config.validate_gill()


def minigpt5_overrides(stage: str) -> dict:
    """GILLConfig values of MiniGPT-5's recipe (paper weights lambda1=0.01 text, lambda2=1 LDM, lambda3=0.1 caption
    MSE; CFG 0.1; Min-SNR 5; MLP input projection; voken features from the predicting positions)."""
    if stage not in ("align", "interleaved"):
        raise ValueError(f"stage must be 'align' or 'interleaved', got {stage!r}")
    return dict(training_stage=stage, img_token_loss_weight=0.01, caption_loss_weight=0.0, ret_loss_weight=0.0,
                gen_loss_weight=0.1, ldm_loss_weight=1.0, ldm_snr_gamma=5.0, cfg_dropout_prob=0.1,
                mapper_input_proj="mlp", mapper_add_input_embeddings=False, voken_feature_position="predicting")
