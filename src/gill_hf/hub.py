"""Hub publishing: one-call ``push_to_hub`` for GILL models, processors and pipelines, the model card, and loading
(possibly sharded) adapter weights from a local folder or a Hub repo.

A push stages everything in a temporary folder (``save_pretrained`` output, ``README.md`` card, optional retrieval
index) and sends it as one commit, so a failed upload changes neither the repo nor anything local.
"""

import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors.torch
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError
from tqdm.auto import tqdm
from transformers.utils import cached_file

from .configuration_gill import GILLConfig
from .modeling_gill import ADAPTER_WEIGHTS_NAME, LORA_SUBFOLDER

ADAPTER_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
RETRIEVAL_INDEX_DIR = "retrieval_index"
MODEL_CARD_TEMPLATE = Path(__file__).with_name("MODEL_CARD.md")  # the top-level MODEL_CARD.md, packaged
CARD_TAGS = ["gill", "multimodal", "text-to-image", "image-retrieval", "interleaved"]
TRAINING_ARGUMENT_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                            "num_train_epochs", "max_steps", "warmup_steps", "warmup_ratio", "weight_decay",
                            "lr_scheduler_type", "optim", "adam_beta1", "adam_beta2", "max_grad_norm", "bf16", "fp16",
                            "seed")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubPushError(RuntimeError):
    """An upload failed; the message names the repo, the HTTP status and the server's explanation."""


# ---------------------------------------------------------------------------------------------- loading
def load_adapter_weights(path_or_repo: str, **hub_kwargs) -> tuple[dict[str, torch.Tensor], str]:
    """``model.safetensors`` or the shards of ``model.safetensors.index.json`` -> (state dict, file it came from).

    ``hub_kwargs`` (``revision``, ``token``, ``cache_dir``...) go to transformers' ``cached_file``.
    """
    single = cached_file(path_or_repo, ADAPTER_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False,
                         **hub_kwargs)
    if single is not None:
        return safetensors.torch.load_file(single), single
    index = cached_file(path_or_repo, ADAPTER_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    if index is None:
        raise OSError(f"{path_or_repo} holds neither {ADAPTER_WEIGHTS_NAME} nor {ADAPTER_WEIGHTS_INDEX_NAME}: "
                      "it is not a saved GILL adapter")
    with open(index) as handle:
        shards = sorted(set(json.load(handle)["weight_map"].values()))
    state_dict = {}
    for shard in tqdm(shards, desc="adapter shards", disable=len(shards) < 2):
        state_dict.update(safetensors.torch.load_file(cached_file(path_or_repo, shard, **hub_kwargs)))
    return state_dict, index


# ---------------------------------------------------------------------------------------------- model card
def _hub_ids(names: Sequence[str | None]) -> list[str]:
    """The names that are Hub repo ids (``owner/name``), skipping local folders, which the Hub cannot link."""
    return [n for n in names if n and _HUB_ID.match(n) and not os.path.exists(n)]


def _hyperparameter_rows(hyperparameters) -> list[tuple[str, str]]:
    """A mapping, or transformers ``TrainingArguments`` (its key optimisation fields), -> sorted table rows."""
    if hyperparameters is None:
        return []
    if not isinstance(hyperparameters, Mapping):  # TrainingArguments
        values = hyperparameters.to_dict()
        hyperparameters = {k: values[k] for k in TRAINING_ARGUMENT_FIELDS if k in values}
    return [(str(k), str(v)) for k, v in sorted(hyperparameters.items())]


def _eval_table(eval_results) -> str:
    """Rows ``[{"column": value, ...}, ...]`` (or one ``{"metric": value}`` mapping) -> a markdown table."""
    if not eval_results:
        return ""
    if isinstance(eval_results, Mapping):
        eval_results = [{"metric": k, "value": v} for k, v in eval_results.items()]
    columns = list(dict.fromkeys(c for row in eval_results for c in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in eval_results]
    return "\n".join(lines)


def _architecture_rows(config: GILLConfig) -> list[tuple[str, str]]:
    rows = [("visual tokens per image (k)", config.num_visual_tokens),
            ("[IMG] tokens (r)", config.num_img_tokens),
            ("retrieval embedding width (p)", config.ret_emb_dim),
            ("mapper", f"{config.mapper_type}, width {config.mapper_hidden_dim}, "
                       f"{config.mapper_encoder_layers}+{config.mapper_decoder_layers} layers"),
            ("generation conditioning (L x D)", f"{config.num_gen_queries} x {config.gen_emb_dim}"),
            ("LLM hidden state used", config.hidden_layer),
            ("[IMG] input-embedding residual", config.mapper_add_input_embeddings),
            ("decision head input", "[IMG0] state + retrieval score" if config.decision_use_retrieval_score
             else "[IMG0] state")]
    if config.use_lora:
        rows.append(("LoRA on the LLM", f"r={config.lora_r}, alpha={config.lora_alpha}, "
                                        f"modules={config.lora_target_modules}"))
    return [(name, str(value)) for name, value in rows]


def build_model_card(config: GILLConfig, repo_id: str = "<repo_id>", *, revision: str | None = None,
                     num_parameters: int | None = None, datasets: Sequence[str] | None = None,
                     hyperparameters=None, eval_results=None, license: str = "other",
                     tags: Sequence[str] | None = None, has_retrieval_index: bool = False,
                     is_pipeline: bool = False, template_path: str | os.PathLike | None = None) -> ModelCard:
    """The README.md of a GILL repo: Hub metadata plus loading code, architecture, data, hyperparameters, results.

    ``base_model`` lists the backbones that are Hub ids (local folders are left out: the Hub would reject them).
    ``hyperparameters`` is a mapping or ``TrainingArguments``; ``eval_results`` a list of row dicts or a
    ``{metric: value}`` mapping. ``is_pipeline`` switches the loading code to ``GILLPipeline``.
    ``template_path`` defaults to the top-level ``MODEL_CARD.md``.
    """
    template = Path(template_path or MODEL_CARD_TEMPLATE)
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found; pass template_path=")
    backbones = [config.text_model_name_or_path, config.vision_model_name_or_path,
                 config.diffusion_model_name_or_path]
    extra_tags = ["minigpt5", "lora"] if config.use_lora else []
    card_data = ModelCardData(library_name="gill_hf", pipeline_tag="any-to-any", base_model=_hub_ids(backbones) or None,
                              base_model_relation="adapter", license=license, datasets=list(datasets or []) or None,
                              tags=list(dict.fromkeys([*CARD_TAGS, *extra_tags, *(tags or [])])))
    return ModelCard.from_template(
        card_data, template_path=str(template), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        revision_arg=f', revision="{revision}"' if revision else "",
        num_parameters=f"{num_parameters:,}" if num_parameters is not None else "the adapter's",
        text_model=backbones[0], vision_model=backbones[1], diffusion_model=backbones[2],
        last_img=config.num_img_tokens - 1, architecture=_architecture_rows(config), datasets=list(datasets or []),
        hyperparameters=_hyperparameter_rows(hyperparameters), eval_table=_eval_table(eval_results),
        has_retrieval_index=has_retrieval_index, is_pipeline=is_pipeline, use_lora=config.use_lora)


# ---------------------------------------------------------------------------------------------- pushing
def find_gill_model(obj):
    """The GILL model itself, or the one inside a pipeline (its ``gill_model`` component); None for a processor."""
    if hasattr(obj, "adapter") and isinstance(getattr(obj, "config", None), GILLConfig):
        return obj
    inner = getattr(obj, "gill_model", None)
    return inner if inner is not None and hasattr(inner, "adapter") else None


def _save_into(obj, folder: str, max_shard_size) -> list[str]:
    """``obj.save_pretrained(folder)``; returns the remote files the new ones replace (old weights, shards, LoRA)."""
    from transformers import PreTrainedModel

    if isinstance(obj, PreTrainedModel):
        obj.save_pretrained(folder, max_shard_size=max_shard_size)
        return ["model*.safetensors", ADAPTER_WEIGHTS_INDEX_NAME, f"{LORA_SUBFOLDER}/*"]
    obj.save_pretrained(folder)  # processors and diffusers pipelines
    return []


def push_to_hub(obj, repo_id: str, *, revision: str | None = None, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: str | bool | None = None,
                create_pr: bool = False, max_shard_size: int | str = "5GB", retrieval_index=None,
                datasets: Sequence[str] | None = None, hyperparameters=None, eval_results=None, license: str = "other",
                tags: Sequence[str] | None = None, model_card: bool = True) -> CommitInfo:
    """Upload ``obj`` (a GILL model, processor or pipeline) to ``repo_id`` in one commit and return its info.

    The repo (and ``revision`` as a branch off main) is created when missing. A model uploads its adapter-only
    safetensors (sharded above ``max_shard_size``; older weight files and a stale ``lora/`` in the repo are
    replaced), config, processor and LoRA adapter; a pipeline what its ``save_pretrained`` writes.
    ``retrieval_index`` (a :class:`~gill_hf.RetrievalIndex` or a saved index folder) goes to ``retrieval_index/``.
    With ``model_card`` and a GILL model at hand, a gill_hf ``README.md`` is written (see :func:`build_model_card`
    for ``datasets``, ``hyperparameters``, ``eval_results``, ``license``, ``tags``).
    Raises :class:`HubPushError` when the Hub refuses; nothing local is modified either way.
    """
    if retrieval_index is not None and not hasattr(retrieval_index, "save") and not os.path.isdir(retrieval_index):
        raise FileNotFoundError(f"retrieval_index={os.fspath(retrieval_index)!r} is neither a RetrievalIndex nor a "
                                "folder")
    api = HfApi(token=token)
    target = f"{repo_id}@{revision or 'main'}"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="gill-push-") as staging:
            stale = _save_into(obj, staging, max_shard_size)
            index_dir = os.path.join(staging, RETRIEVAL_INDEX_DIR)
            if hasattr(retrieval_index, "save"):
                retrieval_index.save(index_dir)
            elif retrieval_index is not None:
                shutil.copytree(retrieval_index, index_dir)
            gill_model = find_gill_model(obj)
            if model_card and gill_model is not None:
                card = build_model_card(
                    gill_model.config, repo_id, revision=revision,
                    num_parameters=sum(p.numel() for p in gill_model.adapter.parameters()), datasets=datasets,
                    hyperparameters=hyperparameters, eval_results=eval_results, license=license, tags=tags,
                    has_retrieval_index=os.path.isdir(index_dir), is_pipeline=gill_model is not obj)
                card.save(os.path.join(staging, "README.md"))
            return api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or f"Upload {type(obj).__name__} with gill_hf",
                                     commit_description=commit_description, delete_patterns=stale or None)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = " Check that the token (HF_TOKEN or `hf auth login`) has write access." if status in (401, 403) \
            else ""
        raise HubPushError(f"pushing {type(obj).__name__} to {target} failed with HTTP {status}: "
                           f"{err.server_message or err}. No commit was created and nothing local was changed."
                           f"{hint}") from err
