"""``gill-hf train CONFIG.yaml [--set a.b=value ...]``: train GILL (stage 1) or MiniGPT-5 stage 2 with the Trainer.

Run it under ``accelerate launch`` or ``torchrun`` for multi-process training; nothing else changes. Config::

    model:
      text_model: facebook/opt-6.7b          # backbones for a fresh adapter ...
      vision_model: openai/clip-vit-large-patch14
      diffusion_model: stable-diffusion-v1-5/stable-diffusion-v1-5
      from_pretrained: null                  # ... or a trained GILL folder to continue from (e.g. stage 1)
      lora: false                            # wrap the LLM in LoRA (r/alpha/dropout/targets from config)
      config: {training_stage: align}        # GILLConfig overrides (loss weights, cfg_dropout_prob, ...)
    data:
      tsv: cc3m_train.tsv                    # stage 1: caption<TAB>image
      image_dir: null                        # default: the TSV's folder
      targets: cc3m_targets/                 # from `gill-hf precompute-targets`
      vist: null                             # stage 2: VIST SIS JSON (images in vist_image_dir)
      vist_image_dir: null
      max_length: 32
    training:                                # TrainingArguments fields, plus:
      output_dir: runs/gill
      activation_checkpointing: false
      mapper_lr_mult: 1.0
    resume_from_checkpoint: null             # a checkpoint folder, or true for the latest in output_dir
"""

import argparse
import copy

import yaml

DEFAULTS = {"model": {"text_model": None, "vision_model": None, "diffusion_model": None, "from_pretrained": None,
                      "lora": False, "config": {}},
            "data": {"tsv": None, "image_dir": None, "targets": None, "vist": None, "vist_image_dir": None,
                     "max_length": 32, "vist_tasks": ["gen", "text_image", "text"]},
            "training": {"output_dir": None, "activation_checkpointing": False, "mapper_lr_mult": 1.0},
            "resume_from_checkpoint": None}


def load_config(path: str | None, overrides: list[str]) -> dict:
    """YAML file (optional) merged over ``DEFAULTS``, then ``a.b=value`` overrides (values parsed as YAML)."""
    config = copy.deepcopy(DEFAULTS)
    if path:
        with open(path) as f:
            loaded = yaml.safe_load(f) or {}
        unknown = set(loaded) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"{path}: unknown section(s) {sorted(unknown)}; expected {sorted(DEFAULTS)}")
        for key, value in loaded.items():
            if isinstance(config[key], dict):
                config[key].update(value or {})
            else:
                config[key] = value
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set expects key.path=value, got {item!r}")
        dotted, value = item.split("=", 1)
        *parents, leaf = dotted.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = yaml.safe_load(value)
    if not config["training"].get("output_dir"):
        raise ValueError("training.output_dir is required")
    return config


def build_model(model_cfg: dict):
    """A fresh GILL on the named backbones, or a trained one (``from_pretrained``), in the stage's model class."""
    from ..training import GILLForInterleavedTraining, apply_lora, set_training_fields
    from ..training.lora import lora_parameters

    overrides = dict(model_cfg.get("config") or {})
    if model_cfg.get("from_pretrained"):
        model = GILLForInterleavedTraining.from_pretrained(model_cfg["from_pretrained"])
        set_training_fields(model.config, **overrides)
    else:
        missing = [k for k in ("text_model", "vision_model") if not model_cfg.get(k)]
        if missing:
            raise ValueError(f"model.{missing[0]} is required unless model.from_pretrained is given")
        model = GILLForInterleavedTraining.from_backbones(model_cfg["text_model"], model_cfg["vision_model"],
                                                          model_cfg.get("diffusion_model"), **overrides)
    model.train()
    if (model_cfg.get("lora") or model.config.use_lora) and not hasattr(model.language_model, "peft_config"):
        apply_lora(model)
    for param in lora_parameters(model).values():  # a loaded LoRA adapter continues training
        param.requires_grad_(True)
    return model


def build_trainer(config: dict):
    from ..training import (CaptionImageDataset, InterleavedDataCollator, LatentDiffusionLoss, TargetStore,
                            VISTTaskDataset, train_gill)

    model = build_model(config["model"])
    data, training = config["data"], dict(config["training"])
    ldm_loss = None
    if model.config.ldm_loss_weight > 0:
        diffusion = config["model"].get("diffusion_model") or model.config.diffusion_model_name_or_path
        ldm_loss = LatentDiffusionLoss.from_pretrained(diffusion, snr_gamma=model.config.ldm_snr_gamma)
    collator, targets = None, None
    if model.config.training_stage == "interleaved":
        if not data.get("vist"):
            raise ValueError("training_stage 'interleaved' needs data.vist (a VIST SIS JSON)")
        dataset = VISTTaskDataset.from_json(data["vist"], data.get("vist_image_dir"), tasks=data["vist_tasks"])
        collator = InterleavedDataCollator(model.processor, ldm_image_size=ldm_loss.image_size if ldm_loss else None)
    else:
        if not data.get("tsv"):
            raise ValueError("training_stage 'align' needs data.tsv (caption<TAB>image)")
        dataset = CaptionImageDataset.from_tsv(data["tsv"], data.get("image_dir"))
        targets = TargetStore(data["targets"]) if data.get("targets") else None
    output_dir = training.pop("output_dir")
    return train_gill(model, dataset, output_dir, data_collator=collator, targets=targets, ldm_loss=ldm_loss,
                      max_length=data["max_length"], **training)


def run(args) -> int:
    config = load_config(args.config, args.set or [])
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
    parser.set_defaults(func=run)
