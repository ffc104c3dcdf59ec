"""``gill-hf train CONFIG.yaml [--set a.b=value ...]``: train GILL (stage 1) or MiniGPT-5 stage 2 with the Trainer.

Run it under ``accelerate launch`` or ``torchrun`` for multi-process training; nothing else changes. Streams
(shards, ``streaming: true``) need ``training.max_steps``; each process reads its own part, and a resumed run continues
at the exact sample. Config::

    model:
      text_model: facebook/opt-6.7b          # backbones for a fresh adapter ...
      vision_model: openai/clip-vit-large-patch14
      diffusion_model: stable-diffusion-v1-5/stable-diffusion-v1-5
      from_pretrained: null                  # ... or a trained GILL folder to continue from (e.g. stage 1)
      lora: false                            # wrap the LLM in LoRA (r/alpha/dropout/targets from config)
      config: {training_stage: align}        # GILLConfig overrides (loss weights, cfg_dropout_prob, ...)
    data:
      tsv: cc3m_train.tsv                    # stage 1: caption<TAB>image, or one of:
      shards: null                           #   webdataset shards (img2dataset): 'cc3m/{00000..00331}.tar', a
                                             #   folder of *.tar or a list (--train-shards); streamed
      dataset: null                          #   datasets.load_dataset(dataset, data_files=, split=) (--train-dataset):
      data_files: null                       #   e.g. webdataset / imagefolder / parquet, or a dataset folder
      split: train
      streaming: false                       #   read it as a stream (--streaming)
      columns: null                          #   {caption: txt, image: jpg}: the dataset's columns
      shuffle_buffer: 0                      # streams: seeded shuffle buffer (training.data_seed or seed)
      image_dir: null                        # default: the TSV's folder
      targets: cc3m_targets/                 # from `gill-hf precompute-targets` (of the TSV / shards / dataset)
      vist: null                             # stage 2: VIST SIS JSON (images in vist_image_dir), and / or
      vist_image_dir: null
      mmdialog: null                         #   MMDialog JSONL conversations (--mmdialog; <media_id>.jpg images in
      mmdialog_image_dir: null               #   mmdialog_image_dir, default the file's folder)
      mmdialog_max_tokens: 50                # MiniGPT-5's cut: a dialogue stops at a longer turn (null: no cut)
      prompt_format: plain                   # stage 2: plain (parts in order) or minigpt5 (its ###Human: prompts)
      max_length: 32
    training:                                # TrainingArguments fields, plus:
      output_dir: runs/gill
      activation_checkpointing: false
      mapper_lr_mult: 1.0
    resume_from_checkpoint: null             # a checkpoint folder, or true for the latest in output_dir
"""

import argparse
import copy
import dataclasses
import difflib
import os
import typing

import yaml

from . import UsageError, existing_path, found_shards, model_source, output_path

STREAM_DEFAULTS = {"shards": None, "dataset": None, "data_files": None, "split": "train", "streaming": False,
                   "columns": None, "shuffle_buffer": 0}  # stage-1 sources other than the TSV
DEFAULTS = {"model": {"text_model": None, "vision_model": None, "diffusion_model": None, "from_pretrained": None,
                      "lora": False, "config": {}},
            "data": {"tsv": None, "image_dir": None, "targets": None, "vist": None, "vist_image_dir": None,
                     "max_length": 32, "vist_tasks": ["gen", "text_image", "text"], "mmdialog": None,
                     "mmdialog_image_dir": None, "mmdialog_max_tokens": 50, "prompt_format": "plain",
                     **STREAM_DEFAULTS},
            "training": {"output_dir": None, "activation_checkpointing": False, "mapper_lr_mult": 1.0},
            "resume_from_checkpoint": None}
# The type of every field of the model / data sections and of the top-level scalars (training: TrainingArguments).
FIELD_TYPES = {"model": {"text_model": str | None, "vision_model": str | None, "diffusion_model": str | None,
                         "from_pretrained": str | None, "lora": bool, "config": dict | None},
               "data": {"tsv": str | None, "image_dir": str | None, "targets": str | None, "vist": str | None,
                        "vist_image_dir": str | None, "max_length": int, "vist_tasks": list[str],
                        "shards": str | list[str] | None, "dataset": str | None,
                        "data_files": str | list[str] | dict | None, "split": str, "streaming": bool,
                        "columns": dict | None, "shuffle_buffer": int, "mmdialog": str | None,
                        "mmdialog_image_dir": str | None, "mmdialog_max_tokens": int | None, "prompt_format": str},
               "resume_from_checkpoint": str | bool | None}
TRAIN_GILL_FIELDS = {"activation_checkpointing": bool, "mapper_lr_mult": float}  # train_gill's own options
# GILLConfig fields the model section sets itself (backbones) or the processor fills in.
NOT_CONFIG_FIELDS = ("text_config", "vision_config", "img_token_ids", "image_token_id", "text_model_name_or_path",
                     "vision_model_name_or_path", "diffusion_model_name_or_path")


def section_fields(section: str) -> dict:
    """Field name -> type of a config section ("model", "data", "training" or "model.config")."""
    if section == "training":
        from transformers import TrainingArguments

        args = {f.name: f.type for f in dataclasses.fields(TrainingArguments) if f.init}
        return {**args, **TRAIN_GILL_FIELDS}
    if section == "model.config":
        from ..configuration_gill import GILLConfig

        return {k: v for k, v in GILLConfig.__annotations__.items() if k not in NOT_CONFIG_FIELDS}
    return FIELD_TYPES[section]


def _type_name(expected) -> str:
    if typing.get_origin(expected) is typing.Literal:
        return f"one of {list(typing.get_args(expected))}"
    return getattr(expected, "__name__", None) or str(expected).replace("typing.", "")


def check_value(where: str, value, expected):
    """``value`` if it fits ``expected`` (an int where a float is expected becomes that float), else
    ``UsageError``."""
    from huggingface_hub.dataclasses import type_validator

    if isinstance(value, int) and not isinstance(value, bool) and float in typing.get_args(expected) + (expected,):
        value = float(value)
    try:
        type_validator(where, value, expected)
        return value
    except (TypeError, ValueError):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (YAML reads numbers like 1e-4 as text; write 1.0e-4)"
            except ValueError:
                pass
        raise UsageError(f"{where}: expected {_type_name(expected)}, got {value!r}{hint}") from None


def _unknown(where: str, name: str, known) -> UsageError:
    close = difflib.get_close_matches(name, list(known), n=1)
    suggestion = f"; did you mean {close[0]!r}?" if close else f"; expected one of {sorted(known)}"
    return UsageError(f"{where}: unknown field {name!r}{suggestion}")


def check_fragment(fragment: dict, source: str):
    """Check the names and types of a (partial) config, the YAML file's content or one ``--set`` (errors name
    ``source``); ints given for float fields become floats in place."""
    if not isinstance(fragment, dict):
        raise UsageError(f"{source}: expected a mapping of sections {sorted(DEFAULTS)}, got {fragment!r}")
    for section, body in fragment.items():
        if section not in DEFAULTS:
            raise _unknown(source, section, DEFAULTS)
        if not isinstance(DEFAULTS[section], dict):
            fragment[section] = check_value(f"{source}: {section}", body, FIELD_TYPES[section])
            continue
        if body is None:
            continue
        if not isinstance(body, dict):
            raise UsageError(f"{source}: {section} must be a mapping of fields, got {body!r}")
        known = section_fields(section)
        for name, value in body.items():
            if name not in known:
                raise _unknown(f"{source}: {section}", name, known)
            body[name] = check_value(f"{source}: {section}.{name}", value, known[name])
        config = body.get("config") if section == "model" else None
        for name, value in (config or {}).items():
            known = section_fields("model.config")
            if name not in known:
                raise _unknown(f"{source}: model.config", name, known)
            config[name] = check_value(f"{source}: model.config.{name}", value, known[name])


def _merge(config: dict, fragment: dict):
    """``fragment``'s values over ``config`` (sections and ``model.config`` merged key by key)."""
    for section, body in fragment.items():
        if isinstance(config[section], dict):
            for name, value in (body or {}).items():
                if name == "config" and section == "model":
                    config["model"]["config"] = {**(config["model"]["config"] or {}), **(value or {})}
                else:
                    config[section][name] = value
        else:
            config[section] = body


def _read_yaml(path: str) -> dict:
    path = existing_path(path, "config", "file")
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML: {' '.join(str(error).split())}") from None


def _override(item: str) -> dict:
    """``a.b=value`` -> ``{"a": {"b": value}}`` (the value parsed as YAML)."""
    if "=" not in item:
        raise UsageError(f"--set expects key.path=value, got {item!r}")
    dotted, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise UsageError(f"--set {item}: the value is not valid YAML: {' '.join(str(error).split())}") from None
    keys = dotted.split(".")
    if not all(keys) or len(keys) > 3 or (len(keys) == 3 and keys[:2] != ["model", "config"]):
        raise UsageError(f"--set {item}: expected section.field (or model.config.field), got {dotted!r}")
    for key in reversed(keys):
        value = {key: value}
    return value


def load_config(path: str | None, overrides: list[str], data_flags: dict | None = None) -> dict:
    """YAML file (optional) merged over ``DEFAULTS``, then ``a.b=value`` overrides (values parsed as YAML), then the
    data flags (``--train-shards`` ...: data fields, not parsed); every name, type and input path is checked here
    (``UsageError``), before anything loads."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        loaded = _read_yaml(path)
        check_fragment(loaded, path)
        _merge(config, loaded)
    for item in overrides:
        fragment = _override(item)
        check_fragment(fragment, f"--set {item}")
        _merge(config, fragment)
    if data_flags:
        fragment = {"data": dict(data_flags)}
        check_fragment(fragment, "command line")
        _merge(config, fragment)
    check_config(config)
    return config


def check_config(config: dict):
    """What the run needs, checked before any model loads: output_dir, backbones or a trained folder, the stage's
    data files, the GILLConfig overrides, the TrainingArguments and the checkpoint to resume from."""
    from transformers.trainer_utils import get_last_checkpoint

    model, data, training = config["model"], config["data"], dict(config["training"])
    if not training.get("output_dir"):
        raise UsageError("training.output_dir is required")
    output_dir = config["training"]["output_dir"] = output_path(training.pop("output_dir"), "training.output_dir",
                                                                "folder")
    stage = _check_model(model)
    for name, kind in (("tsv", "file"), ("image_dir", "folder"), ("targets", "folder"), ("vist", "file"),
                       ("vist_image_dir", "folder"), ("mmdialog", "file"), ("mmdialog_image_dir", "folder")):
        if data.get(name):
            data[name] = existing_path(data[name], f"data.{name}", kind)
    if stage == "interleaved" and not (data.get("vist") or data.get("mmdialog")):
        raise UsageError(f"training_stage {stage!r} needs data.vist (a VIST SIS JSON) and / or data.mmdialog "
                         f"(MMDialog JSONL)")
    _check_stage2_data(data, stage)
    if stage != "interleaved":
        _check_pairs_source(data, training)
    if data["max_length"] < 1:
        raise UsageError(f"data.max_length must be >= 1, got {data['max_length']}")
    _check_tasks(data["vist_tasks"])
    _check_training_arguments(output_dir, training)
    resume = config["resume_from_checkpoint"]
    if isinstance(resume, str):
        config["resume_from_checkpoint"] = existing_path(resume, "resume_from_checkpoint", "folder")
    elif resume and not (os.path.isdir(output_dir) and get_last_checkpoint(output_dir)):
        raise UsageError(f"resume_from_checkpoint: true needs a checkpoint-* folder in {output_dir}; none found")


def _check_pairs_source(data: dict, training: dict):
    """Stage 1 reads exactly one of data.tsv, data.shards (listed and opened here) and data.dataset; stream
    settings apply to streams, a stream's targets need caption keys, and streams need max_steps."""
    from . import looks_local

    given = [name for name in ("tsv", "shards", "dataset") if data.get(name)]
    if len(given) != 1:
        raise UsageError(f"training_stage 'align' needs data.tsv (caption<TAB>image), data.shards (webdataset "
                         f"tars) or data.dataset, exactly one; got {given or 'none'}")
    for name in ("data_files", "columns", "streaming"):
        if data[name] != STREAM_DEFAULTS[name] and not data.get("dataset"):
            raise UsageError(f"data.{name} applies to data.dataset only")
    if data["split"] != STREAM_DEFAULTS["split"] and not data.get("dataset"):
        raise UsageError("data.split applies to data.dataset only")
    stream = bool(data.get("shards")) or (bool(data.get("dataset")) and data["streaming"])
    if data["shuffle_buffer"] < 0 or (data["shuffle_buffer"] and not stream):
        raise UsageError(f"data.shuffle_buffer ({data['shuffle_buffer']}) takes a value >= 0 and applies to streams "
                         "(data.shards, or data.dataset with data.streaming; the Trainer shuffles the others)")
    if data.get("shards"):
        data["shards"] = found_shards(_as_list(data["shards"]), "data.shards")
    if data.get("dataset") and looks_local(data["dataset"]):
        data["dataset"] = existing_path(data["dataset"], "data.dataset")
    if stream and data.get("targets"):
        _check_keyed_targets(data["targets"])
    if stream and not training.get("max_steps", -1) > 0:
        raise UsageError("a stream has no length: set training.max_steps")


def _check_keyed_targets(folder: str):
    """A stream's data.targets: a finished store with caption keys (its examples find their rows by caption)."""
    from ..training.targets import TargetStore

    try:
        TargetStore(folder).check_caption_keys()
    except (ValueError, FileNotFoundError) as error:
        raise UsageError(f"data.targets: {error}") from None


def _check_stage2_data(data: dict, stage: str):
    """VIST, MMDialog and the prompt format are stage-2 settings (with their own ranges); the pairs sources and
    their targets are stage 1's."""
    from ..training.data import PROMPT_FORMATS

    if stage != "interleaved":
        for name in ("vist", "mmdialog"):
            if data.get(name):
                raise UsageError(f"data.{name} is stage-2 data; training_stage is {stage!r} (set model.config."
                                 "training_stage=interleaved)")
    else:
        given = [f"data.{name}" for name in ("tsv", "shards", "dataset", "targets") if data.get(name)]
        if given:
            raise UsageError(f"{given} are stage-1 data; training_stage 'interleaved' reads data.vist / "
                             "data.mmdialog")
    if data["prompt_format"] not in PROMPT_FORMATS:
        raise UsageError(f"data.prompt_format must be one of {list(PROMPT_FORMATS)}, got {data['prompt_format']!r}")
    if data["mmdialog_max_tokens"] is not None and data["mmdialog_max_tokens"] < 1:
        raise UsageError(f"data.mmdialog_max_tokens must be >= 1 or null, got {data['mmdialog_max_tokens']}")


def _as_list(value) -> list:
    return [value] if isinstance(value, str) else list(value)


def _check_model(model: dict) -> str:
    """Backbone / trained-model sources and the GILLConfig overrides; returns the training stage."""
    from huggingface_hub.errors import StrictDataclassError

    from ..configuration_gill import GILLConfig
    from ..training import set_training_fields

    overrides = dict(model.get("config") or {})
    for name in ("text_model", "vision_model", "diffusion_model", "from_pretrained"):
        if model.get(name):
            model[name] = model_source(model[name], f"model.{name}")
    try:
        if model.get("from_pretrained"):
            saved = GILLConfig.from_pretrained(model["from_pretrained"])  # config.json only
            set_training_fields(saved, **overrides)
            return saved.training_stage
        missing = [k for k in ("text_model", "vision_model") if not model.get(k)]
        if missing:
            raise UsageError(f"model.{missing[0]} is required unless model.from_pretrained is given")
        # hidden_layer's range depends on the LLM, read only when it loads
        return GILLConfig(**{k: v for k, v in overrides.items() if k != "hidden_layer"}).training_stage
    except UsageError:
        raise
    except (ValueError, TypeError, StrictDataclassError) as error:
        if isinstance(error, StrictDataclassError) and error.__cause__ is not None:
            error = error.__cause__  # the validator's own message
        raise UsageError(f"model.config: {' '.join(str(error).split())}") from None


def _check_tasks(tasks: list[str]):
    from ..training.data import TASKS

    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise UsageError(f"data.vist_tasks must be a non-empty list of {list(TASKS)}, got {tasks}")


def _check_training_arguments(output_dir: str, training: dict):
    """Build the run's ``TrainingArguments`` once (cheap) so that a value it rejects is a usage error."""
    from ..training.trainer import training_arguments

    args = {k: v for k, v in training.items() if k not in TRAIN_GILL_FIELDS}
    try:
        training_arguments(output_dir, **args)
    except (ValueError, TypeError) as error:
        raise UsageError(f"training: {' '.join(str(error).split())}") from None


def build_model(model_cfg: dict):
    """A fresh GILL on the named backbones, or a trained one (``from_pretrained``), in the stage's model class."""
    from ..training import GILLForInterleavedTraining, apply_lora, set_training_fields
    from ..training.lora import lora_parameters

    overrides = dict(model_cfg.get("config") or {})
    if model_cfg.get("from_pretrained"):
        model = GILLForInterleavedTraining.from_pretrained(model_cfg["from_pretrained"])
        set_training_fields(model.config, **overrides)
    else:  # check_config made sure the backbones are named
        model = GILLForInterleavedTraining.from_backbones(model_cfg["text_model"], model_cfg["vision_model"],
                                                          model_cfg.get("diffusion_model"), **overrides)
    model.train()
    if (model_cfg.get("lora") or model.config.use_lora) and not hasattr(model.language_model, "peft_config"):
        apply_lora(model)
    for param in lora_parameters(model).values():  # a loaded LoRA adapter continues training
        param.requires_grad_(True)
    return model


def build_pairs(data: dict, seed: int, label: str = "data.dataset"):
    """Stage 1's image-caption pairs: the TSV, the shards' stream or the ``datasets`` dataset (a stream when
    ``data.streaming``); a dataset that does not load or lacks the columns is a ``UsageError`` naming ``label``."""
    from ..training import CaptionImageDataset, StreamingCaptionDataset
    from ..training.data import as_caption_dataset

    if data.get("tsv"):
        return CaptionImageDataset.from_tsv(data["tsv"], data.get("image_dir"))
    if data.get("shards"):
        return StreamingCaptionDataset.from_shards(data["shards"], shuffle_buffer=data["shuffle_buffer"], seed=seed)
    import datasets

    try:
        dataset = datasets.load_dataset(data["dataset"], data_files=data["data_files"], split=data["split"],
                                        streaming=data["streaming"])
        if data["streaming"]:
            return StreamingCaptionDataset.from_hf_dataset(dataset, data["columns"],
                                                           shuffle_buffer=data["shuffle_buffer"], seed=seed)
        return as_caption_dataset(dataset, data["columns"])
    except (ValueError, FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as error:
        raise UsageError(f"{label} {data['dataset']}: {' '.join(str(error).split())}") from None


def build_trainer(config: dict):
    from torch.utils.data import ConcatDataset

    from ..training import InterleavedDataCollator, LatentDiffusionLoss, TargetStore, VISTTaskDataset, train_gill
    from ..training.mmdialog import MMDialogDataset, read_mmdialog

    data, training = config["data"], dict(config["training"])
    seed = training.get("data_seed") if training.get("data_seed") is not None else training.get("seed", 42)
    stage2 = bool(data.get("vist") or data.get("mmdialog"))  # check_config: exactly the interleaved stage
    pairs = build_pairs(data, seed) if not stage2 else None  # stage 1: read before the backbones load
    dialogues = read_mmdialog(data["mmdialog"], data.get("mmdialog_image_dir")) if data.get("mmdialog") else None
    model = build_model(config["model"])
    ldm_loss = None
    if model.config.ldm_loss_weight > 0:
        diffusion = config["model"].get("diffusion_model") or model.config.diffusion_model_name_or_path
        ldm_loss = LatentDiffusionLoss.from_pretrained(diffusion, snr_gamma=model.config.ldm_snr_gamma)
    collator, targets = None, None
    if model.config.training_stage == "interleaved":
        parts = [VISTTaskDataset.from_json(data["vist"], data.get("vist_image_dir"), tasks=data["vist_tasks"])] \
            if data.get("vist") else []
        if dialogues is not None:
            max_tokens = data["mmdialog_max_tokens"]
            parts.append(MMDialogDataset(dialogues, model.processor.tokenizer if max_tokens else None, max_tokens))
        dataset = parts[0] if len(parts) == 1 else ConcatDataset(parts)
        collator = InterleavedDataCollator(model.processor, ldm_image_size=ldm_loss.image_size if ldm_loss else None,
                                           prompt_format=data["prompt_format"])
    else:
        dataset = pairs
        targets = TargetStore(data["targets"]) if data.get("targets") else None
    output_dir = training.pop("output_dir")
    return train_gill(model, dataset, output_dir, data_collator=collator, targets=targets, ldm_loss=ldm_loss,
                      max_length=data["max_length"], **training)


def run(args) -> int:
    flags = {"shards": args.train_shards, "dataset": args.train_dataset, "streaming": args.streaming or None,
             "mmdialog": args.mmdialog}
    config = load_config(args.config, args.set or [], {k: v for k, v in flags.items() if v is not None})
    trainer = build_trainer(config)
    trainer.train(resume_from_checkpoint=config["resume_from_checkpoint"])
    trainer.save_model()
    return 0


def register(subparsers):
    parser = subparsers.add_parser("train", help="train GILL / MiniGPT-5 adapters with the HF Trainer",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", nargs="?", help="YAML config (see above); optional when --set gives everything")
    parser.add_argument("--set", action="append", metavar="KEY=VALUE",
                        help="override a config value, e.g. --set training.max_steps=100 (repeatable)")
    parser.add_argument("--train-shards", metavar="SHARDS", help="stage-1 webdataset shards (data.shards): a brace "
                        "pattern such as 'cc3m/{00000..00331}.tar' (quoted) or a folder of *.tar")
    parser.add_argument("--train-dataset", metavar="DATASET", help="stage-1 pairs from datasets.load_dataset "
                        "(data.dataset; data.data_files / split / columns in the config)")
    parser.add_argument("--streaming", action="store_true", help="stream data.dataset (data.streaming)")
    parser.add_argument("--mmdialog", metavar="JSONL", help="stage-2 MMDialog conversations (data.mmdialog; images "
                        "in data.mmdialog_image_dir)")
    parser.set_defaults(func=run)
