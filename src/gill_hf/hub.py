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
from safetensors import SafetensorError
from tqdm.auto import tqdm
from transformers.utils import cached_file

from .atomic import MANIFEST_NAME
from .configuration_gill import GILLConfig
from .loading import read_safetensors_header
from .modeling_gill import ADAPTER_WEIGHTS_NAME, LORA_SUBFOLDER, adapter_mismatch_message

ADAPTER_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
RETRIEVAL_INDEX_DIR = "retrieval_index"
MODEL_CARD_TEMPLATE = Path(__file__).with_name("MODEL_CARD.md")  # the top-level MODEL_CARD.md, packaged
CARD_TAGS = ["gill", "multimodal", "text-to-image", "image-retrieval", "interleaved"]
DEFAULT_LICENSE_NAME = "backbone-licenses"  # license "other": the adapter follows its frozen backbones' licenses
TRAINING_ARGUMENT_FIELDS = ("learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                            "num_train_epochs", "max_steps", "warmup_steps", "warmup_ratio", "weight_decay",
                            "lr_scheduler_type", "optim", "adam_beta1", "adam_beta2", "max_grad_norm", "bf16", "fp16",
                            "seed")
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class HubPushError(RuntimeError):
    """An upload failed; the message names the repo, the HTTP status and the server's explanation."""


# ---------------------------------------------------------------------------------------------- loading
SAFETENSORS_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
# local save manifests (gill_hf.atomic) stay local: a Hub commit is atomic anyway, and files edited on the Hub later
# would no longer match them
MANIFEST_PATTERNS = [MANIFEST_NAME, f"*/{MANIFEST_NAME}"]
LORA_CONFIG_NAME = f"{LORA_SUBFOLDER}/adapter_config.json"
LORA_WEIGHTS_NAME = f"{LORA_SUBFOLDER}/adapter_model.safetensors"


def adapter_weight_files(path_or_repo: str, **hub_kwargs) -> tuple[dict[str, str], str]:
    """``({name: local file}, name of the file that lists them)`` for ``model.safetensors``, or for the shards of
    ``model.safetensors.index.json``; names are relative to ``path_or_repo``. ``hub_kwargs`` go to ``cached_file``."""
    single = cached_file(path_or_repo, ADAPTER_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False,
                         **hub_kwargs)
    if single is not None:
        return {ADAPTER_WEIGHTS_NAME: single}, ADAPTER_WEIGHTS_NAME
    index = cached_file(path_or_repo, ADAPTER_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)
    if index is None:
        raise OSError(f"{path_or_repo} holds neither {ADAPTER_WEIGHTS_NAME} nor {ADAPTER_WEIGHTS_INDEX_NAME}: "
                      "it is not a saved GILL adapter")
    try:
        with open(index, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise OSError(f"{os.path.join(path_or_repo, ADAPTER_WEIGHTS_INDEX_NAME)} is not a safetensors index with a "
                      f"weight_map ({type(err).__name__}: {err})") from None
    return {shard: cached_file(path_or_repo, shard, **hub_kwargs) for shard in shards}, ADAPTER_WEIGHTS_INDEX_NAME


def check_adapter_files(files: dict[str, str], where: str, expected: dict[str, tuple] | None = None,
                        source: str | None = None) -> None:
    """Read the safetensors headers of ``files`` (``{name: local file}``, named ``where/name`` in errors) without
    loading them: a truncated or corrupt file is an ``OSError`` naming it. With ``expected`` (``{key: (shape,
    is_float)}``, see ``modeling_gill.expected_adapter_tensors``) keys, shapes and float dtypes are compared too:
    one ``ValueError`` naming ``source`` (default ``where``) and listing every mismatch."""
    found = {}
    for name, local in files.items():
        for key, entry in read_safetensors_header(local, os.path.join(where, name)).items():
            found[key] = (tuple(entry["shape"]), entry["dtype"])
    if expected is None:
        return
    bad_dtypes = [f"{k}: {found[k][1]}" for k in sorted(set(found) & set(expected))
                  if expected[k][1] and found[k][1] not in SAFETENSORS_FLOAT_DTYPES]
    message = adapter_mismatch_message({k: v[0] for k, v in expected.items()}, {k: v[0] for k, v in found.items()},
                                       source or where, bad_dtypes)
    if message:
        raise ValueError(message)


def load_adapter_files(files: dict[str, str], where: str) -> dict[str, torch.Tensor]:
    """The tensors of ``files`` (``{name: local file}``) in one state dict; a file safetensors cannot read is an
    ``OSError`` naming ``where/name``."""
    state_dict = {}
    for name, local in tqdm(files.items(), desc="adapter shards", disable=len(files) < 2):
        try:
            state_dict.update(safetensors.torch.load_file(local))
        except SafetensorError as err:
            raise OSError(f"{os.path.join(where, name)} cannot be read as safetensors: {err}") from err
    return state_dict


def load_adapter_weights(path_or_repo: str, **hub_kwargs) -> tuple[dict[str, torch.Tensor], str]:
    """``model.safetensors`` or the shards of ``model.safetensors.index.json`` -> (state dict, file it came from).

    Headers are checked first (:func:`check_adapter_files`); ``hub_kwargs`` (``revision``, ``token``,
    ``cache_dir``...) go to transformers' ``cached_file``.
    """
    files, listing = adapter_weight_files(path_or_repo, **hub_kwargs)
    check_adapter_files(files, path_or_repo)
    return load_adapter_files(files, path_or_repo), os.path.join(path_or_repo, listing)


def check_lora_files(root: str, where: str, use_lora: bool, **hub_kwargs) -> bool:
    """Whether ``root`` holds a LoRA adapter (``lora/``) to re-apply; its weights' header is checked. A config that
    records LoRA (``use_lora``) without the folder is a ``FileNotFoundError`` naming ``where/lora``."""
    found = {name: cached_file(root, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
             for name in (LORA_CONFIG_NAME, LORA_WEIGHTS_NAME)}
    if found[LORA_CONFIG_NAME] is None:
        if use_lora:
            raise FileNotFoundError(
                f"{os.path.join(where, LORA_SUBFOLDER)} is missing: config.json records a LoRA-tuned language model "
                f"(use_lora=True) but there is no {LORA_CONFIG_NAME}; restore the folder, or set use_lora to false "
                "in config.json to load the model without its LoRA")
        return False
    if found[LORA_WEIGHTS_NAME] is None:
        raise FileNotFoundError(f"{os.path.join(where, LORA_WEIGHTS_NAME)} is missing beside {LORA_CONFIG_NAME}")
    read_safetensors_header(found[LORA_WEIGHTS_NAME], os.path.join(where, LORA_WEIGHTS_NAME))
    return True


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
    rows = [("visual encoder", f"{config.visual_encoder}, {config.visual_projection} projection"
                               + ("" if config.train_visual_projection else " (frozen)")),
            ("visual tokens per image (k)", config.num_visual_tokens),
            ("[IMG] tokens (r)", config.num_img_tokens),
            ("retrieval embedding width (p)", config.ret_emb_dim),
            ("mapper", f"{config.mapper_type}, width {config.mapper_hidden_dim}, "
                       f"{config.mapper_encoder_layers}+{config.mapper_decoder_layers} layers"),
            ("generation conditioning (L x D)", f"{config.num_gen_queries} x {config.gen_emb_dim}"
                                                + (f" + pooled {config.gen_pooled_dim}" if config.gen_pooled_dim else "")
                                                + f" ({config.diffusion_layout} layout)"),
            ("LLM hidden state used", config.hidden_layer),
            ("[IMG] input-embedding residual", config.mapper_add_input_embeddings),
            ("decision head input", "[IMG0] state + retrieval score" if config.decision_use_retrieval_score
             else "[IMG0] state")]
    if config.use_lora:
        rows.append(("LoRA on the LLM", f"r={config.lora_r}, alpha={config.lora_alpha}, "
                                        f"modules={config.lora_target_modules}"))
    return [(name, str(value)) for name, value in rows]


def _check_license_name(license: str, license_name: str | None):
    if license_name is not None and license != "other":
        raise ValueError(f"license_name={license_name!r} only applies with license='other' (got {license!r})")


def build_model_card(config: GILLConfig, repo_id: str = "<repo_id>", *, revision: str | None = None,
                     num_parameters: int | None = None, datasets: Sequence[str] | None = None,
                     hyperparameters=None, eval_results=None, license: str = "other",
                     tags: Sequence[str] | None = None, has_retrieval_index: bool = False,
                     is_pipeline: bool = False, remote_code: bool = False, license_name: str | None = None,
                     template_path: str | os.PathLike | None = None) -> ModelCard:
    """The README.md of a GILL repo: Hub metadata plus loading code, architecture, data, hyperparameters, results.

    ``base_model`` lists the backbones that are Hub ids (local folders are left out: the Hub would reject them).
    ``hyperparameters`` is a mapping or ``TrainingArguments``; ``eval_results`` a list of row dicts or a
    ``{metric: value}`` mapping. ``is_pipeline`` switches the loading code to ``GILLPipeline``; ``remote_code`` adds
    the ``trust_remote_code=True`` loading code for users without gill_hf. ``license_name`` names a license ``other``
    (the Hub asks for one; default ``DEFAULT_LICENSE_NAME``) and is an error with any other license.
    ``template_path`` defaults to the top-level ``MODEL_CARD.md``.
    """
    _check_license_name(license, license_name)
    template = Path(template_path or MODEL_CARD_TEMPLATE)
    if not template.is_file():
        raise FileNotFoundError(f"model card template {template} not found; pass template_path=")
    backbones = [config.text_model_name_or_path, config.vision_model_name_or_path,
                 config.diffusion_model_name_or_path]
    extra_tags = ["minigpt5", "lora"] if config.use_lora else []
    card_data = ModelCardData(library_name="gill_hf", pipeline_tag="any-to-any", base_model=_hub_ids(backbones) or None,
                              base_model_relation="adapter", license=license,
                              license_name=license_name or DEFAULT_LICENSE_NAME if license == "other" else None,
                              datasets=list(datasets or []) or None,
                              tags=list(dict.fromkeys([*CARD_TAGS, *extra_tags, *(tags or [])])))
    return ModelCard.from_template(
        card_data, template_path=str(template), model_name=repo_id.split("/")[-1], repo_id=repo_id,
        revision_arg=f', revision="{revision}"' if revision else "",
        num_parameters=f"{num_parameters:,}" if num_parameters is not None else "the adapter's",
        text_model=backbones[0], vision_model=backbones[1], diffusion_model=backbones[2],
        last_img=config.num_img_tokens - 1, architecture=_architecture_rows(config), datasets=list(datasets or []),
        hyperparameters=_hyperparameter_rows(hyperparameters), eval_table=_eval_table(eval_results),
        has_retrieval_index=has_retrieval_index, is_pipeline=is_pipeline, use_lora=config.use_lora,
        remote_code=remote_code)


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


def _check_remote_code(obj, gill_model):
    """Refuse, before anything is uploaded, remote code that would give a repo failing to load without gill_hf."""
    from .remote_code import check_rebuildable

    if gill_model is not None:
        check_rebuildable(gill_model)
    if gill_model is not None and gill_model is not obj and gill_model.config.use_lora:
        raise ValueError("remote code for a pipeline with a LoRA-tuned LLM is not supported: diffusers' loader does "
                         "not download gill_model/lora/adapter_config.json, so the LoRA would be dropped; push the "
                         "GILL model itself (its repo loads the LoRA) or pass remote_code=False")


def _write_remote_code(obj, staging: str, repo_id: str, revision: str | None):
    from .remote_code import write_model_code, write_pipeline_code

    if os.path.isfile(os.path.join(staging, "model_index.json")):  # a diffusers pipeline
        write_pipeline_code(staging, repo_id, revision)
    else:
        write_model_code(staging)


def push_to_hub(obj, repo_id: str, *, revision: str | None = None, commit_message: str | None = None,
                commit_description: str | None = None, private: bool | None = None, token: str | bool | None = None,
                create_pr: bool = False, max_shard_size: int | str = "5GB", retrieval_index=None,
                datasets: Sequence[str] | None = None, hyperparameters=None, eval_results=None, license: str = "other",
                license_name: str | None = None, tags: Sequence[str] | None = None, model_card: bool = True,
                remote_code: bool = True) -> CommitInfo:
    """Upload ``obj`` (a GILL model, processor or pipeline) to ``repo_id`` in one commit and return its info.

    The repo (and ``revision`` as a branch off main) is created when missing. A model uploads its adapter-only
    safetensors (sharded above ``max_shard_size``; older weight files and a stale ``lora/`` in the repo are
    replaced), config, processor and LoRA adapter; a pipeline what its ``save_pretrained`` writes.
    ``retrieval_index`` (a :class:`~gill_hf.RetrievalIndex` or a saved index folder) goes to ``retrieval_index/``.
    With ``model_card`` and a GILL model at hand, a gill_hf ``README.md`` is written (see :func:`build_model_card`
    for ``datasets``, ``hyperparameters``, ``eval_results``, ``license``, ``license_name``, ``tags``).
    With ``remote_code`` the library's inference modules and ``auto_map`` entries go along
    (:mod:`gill_hf.remote_code`), so the repo also loads with ``trust_remote_code=True`` where gill_hf is not
    installed; a backbone that such loading cannot rebuild (not a transformers class) is then a ``ValueError``.
    Raises :class:`HubPushError` when the Hub refuses; nothing local is modified either way.
    """
    if retrieval_index is not None and not hasattr(retrieval_index, "save") and not os.path.isdir(retrieval_index):
        raise FileNotFoundError(f"retrieval_index={os.fspath(retrieval_index)!r} is neither a RetrievalIndex nor a "
                                "folder")
    _check_license_name(license, license_name)
    gill_model = find_gill_model(obj)
    if remote_code:
        _check_remote_code(obj, gill_model)
    api = HfApi(token=token)
    target = f"{repo_id}@{revision or 'main'}"
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="gill-push-") as staging:
            stale = _save_into(obj, staging, max_shard_size)
            if remote_code:
                _write_remote_code(obj, staging, repo_id, revision)
            index_dir = os.path.join(staging, RETRIEVAL_INDEX_DIR)
            if hasattr(retrieval_index, "save"):
                retrieval_index.save(index_dir)
            elif retrieval_index is not None:
                shutil.copytree(retrieval_index, index_dir)
            if model_card and gill_model is not None:
                card = build_model_card(
                    gill_model.config, repo_id, revision=revision, remote_code=remote_code,
                    num_parameters=sum(p.numel() for p in gill_model.adapter.parameters()), datasets=datasets,
                    hyperparameters=hyperparameters, eval_results=eval_results, license=license,
                    license_name=license_name, tags=tags,
                    has_retrieval_index=os.path.isdir(index_dir), is_pipeline=gill_model is not obj)
                card.save(os.path.join(staging, "README.md"))
            return api.upload_folder(repo_id=repo_id, folder_path=staging, revision=revision, create_pr=create_pr,
                                     commit_message=commit_message or f"Upload {type(obj).__name__} with gill_hf",
                                     commit_description=commit_description, delete_patterns=stale or None,
                                     ignore_patterns=MANIFEST_PATTERNS)
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        hint = " Check that the token (HF_TOKEN or `hf auth login`) has write access." if status in (401, 403) \
            else ""
        raise HubPushError(f"pushing {type(obj).__name__} to {target} failed with HTTP {status}: "
                           f"{err.server_message or err}. No commit was created and nothing local was changed."
                           f"{hint}") from err
