"""Remote code: the library's own inference modules written into a Hub repo, so that transformers' and diffusers'
``trust_remote_code=True`` loaders work where gill_hf is not installed.

* Model and processor repos get, at their root, byte-for-byte copies of ``configuration_gill.py``,
  ``modeling_gill.py``, ``processing_gill.py`` and every module they import relatively (found with transformers'
  ``get_relative_import_files``, the function its loader uses), plus ``auto_map`` entries in ``config.json``
  (``AutoConfig``, ``AutoModel``, ``AutoModelForImageTextToText``) and ``processor_config.json`` (``AutoProcessor``).
* Pipeline repos get the same copies for ``pipeline_gill.py`` and a generated entry module, ``gill_remote.py``, at the
  root and in ``gill_model/`` and ``processor/``; ``model_index.json`` names it (``["gill_remote", class]``).
  diffusers loads a custom pipeline or component as one file and copies only the modules it imports directly, so the
  entry module loads the library's modules from the repo through transformers' dynamic-module loader instead; the repo
  id and revision are written into it at push time.

The library's modules import each other only with flat relative imports (``from .configuration_gill import ...``);
every absolute import names a package installable from PyPI (torch, transformers, diffusers, peft, ...).
"""

import json
import os
import shutil
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
MODEL_ENTRY_MODULES = ("configuration_gill", "modeling_gill", "processing_gill")
PIPELINE_ENTRY_MODULES = ("pipeline_gill",)
ENTRY_MODULE = "gill_remote"  # the generated diffusers entry of a pipeline repo
MODEL_AUTO_MAP = {"AutoConfig": "configuration_gill.GILLConfig",
                  "AutoModel": "modeling_gill.GILLForConditionalGeneration",
                  "AutoModelForImageTextToText": "modeling_gill.GILLForConditionalGeneration"}
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_gill.GILLProcessor"}
PIPELINE_CLASSES = {"_class_name": "GILLPipeline", "gill_model": "GILLForConditionalGeneration",
                    "processor": "GILLProcessor"}
ENTRY_TEMPLATE = '''"""diffusers entry of the gill_hf pipeline repo {repo_id}, written by gill_hf's push_to_hub.

diffusers loads a custom pipeline or component as a single file, without the modules it imports, so the classes are
loaded from the library modules at the root of this repo by transformers' dynamic-module loader.
"""

from transformers.dynamic_module_utils import get_class_from_dynamic_module

REPO_ID = {repo_id!r}
REVISION = {revision!r}

# The components first: pipeline_gill then imports these same modules (and classes) instead of fresh copies.
GILLForConditionalGeneration = get_class_from_dynamic_module("modeling_gill.GILLForConditionalGeneration", REPO_ID,
                                                             revision=REVISION)
GILLProcessor = get_class_from_dynamic_module("processing_gill.GILLProcessor", REPO_ID, revision=REVISION)
GILLPipeline = get_class_from_dynamic_module("pipeline_gill.GILLPipeline", REPO_ID, revision=REVISION)
'''


def remote_code_files(entry_modules=MODEL_ENTRY_MODULES) -> dict[str, Path]:
    """``{file name: installed path}`` of ``entry_modules`` and every module they import relatively.

    Raises ``ValueError`` naming the module when one imports a relative module that is not a flat sibling file (the
    Hub loaders fetch only ``<name>.py`` files next to it) or imports ``gill_hf`` itself.
    """
    from transformers.dynamic_module_utils import get_imports, get_relative_import_files, get_relative_imports

    paths = [PACKAGE_DIR / f"{name}.py" for name in entry_modules]
    for path in list(paths):
        for name in get_relative_imports(path):
            if "." in name or not (PACKAGE_DIR / f"{name}.py").is_file():
                raise ValueError(f"gill_hf/{path.name} imports .{name}, which is not a module file beside it: remote "
                                 "code can only hold flat sibling modules (import it inside a function of a module "
                                 "that is not pushed, or move it)")
        if "gill_hf" in get_imports(path):
            raise ValueError(f"gill_hf/{path.name} imports gill_hf absolutely; remote code needs relative imports")
        paths += [Path(p) for p in get_relative_import_files(path) if Path(p) not in paths]
    return {path.name: path for path in paths}


def check_rebuildable(gill_model):
    """Raise ``ValueError`` naming a backbone that a Hub user without gill_hf could not rebuild from the config.

    Remote loading rebuilds the LLM with ``AutoModelForCausalLM`` from ``text_config`` and the vision encoder as
    ``visual_encoders.vision_model_class`` does: the LLM must be a transformers class (not a local or registered
    custom class) and the vision encoder exactly that class (transformers' own, or the pushed BLIP-2 wrapper).
    """
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from .visual_encoders import vision_model_class

    llm = gill_model.language_model
    llm = llm.get_base_model() if hasattr(llm, "peft_config") else llm  # LoRA: the wrapped transformers model
    model_type = getattr(gill_model.config.text_config, "model_type", None)
    for part, module, expected in (("language model", llm, None), ("vision encoder", gill_model.vision_model,
                                                                     vision_model_class(gill_model.config))):
        cls = type(module)
        builtin = cls is expected or expected is None and cls.__module__.startswith("transformers.models.")
        if not builtin or (part == "language model" and model_type not in CONFIG_MAPPING_NAMES):
            raise ValueError(f"remote code cannot rebuild the {part}: {cls.__module__}.{cls.__name__} "
                             f"(model_type {getattr(module.config, 'model_type', None)!r}) is not a class built into "
                             "transformers, so the repo would fail to load without gill_hf. Push with "
                             "remote_code=False, or use a transformers backbone.")


def _add_auto_map(json_path: str, auto_map: dict[str, str]):
    with open(json_path) as handle:
        values = json.load(handle)
    values["auto_map"] = {**values.get("auto_map", {}), **auto_map}
    with open(json_path, "w") as handle:
        json.dump(values, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _copy_modules(folder: str, entry_modules) -> list[str]:
    files = remote_code_files(entry_modules)
    for name, path in files.items():
        shutil.copyfile(path, os.path.join(folder, name))
    return sorted(files)


def write_model_code(folder: str) -> list[str]:
    """Add the model/processor modules and ``auto_map`` entries to a saved model or processor ``folder``; returns
    the module files written."""
    written = _copy_modules(folder, MODEL_ENTRY_MODULES)
    for name, auto_map in (("config.json", MODEL_AUTO_MAP), ("processor_config.json", PROCESSOR_AUTO_MAP)):
        if os.path.isfile(os.path.join(folder, name)):
            _add_auto_map(os.path.join(folder, name), auto_map)
    return written


def write_pipeline_code(folder: str, repo_id: str, revision: str | None) -> list[str]:
    """Add the pipeline modules, the ``gill_remote.py`` entries and the remote ``model_index.json`` entries to a saved
    pipeline ``folder`` pushed to ``repo_id`` at ``revision``; returns the files written."""
    written = _copy_modules(folder, PIPELINE_ENTRY_MODULES)
    entry = ENTRY_TEMPLATE.format(repo_id=repo_id, revision=revision or "main")
    for sub in ("", "gill_model", "processor"):
        Path(folder, sub, f"{ENTRY_MODULE}.py").write_text(entry)
        written.append(f"{sub}/{ENTRY_MODULE}.py".lstrip("/"))
    index_path = os.path.join(folder, "model_index.json")
    with open(index_path) as handle:
        index = json.load(handle)
    for key, class_name in PIPELINE_CLASSES.items():
        index[key] = [ENTRY_MODULE, class_name]
    with open(index_path, "w") as handle:
        json.dump(index, handle, indent=2, sort_keys=True)
        handle.write("\n")
    return written


def local_model_index(config: dict, classes: dict[str, type]) -> dict:
    """A remote-code ``model_index.json`` dict read as the classes already imported (``{class name: class}``):
    ``[ENTRY_MODULE, name]`` entries become ``name`` (``_class_name``) or ``[class.__module__, name]``."""
    for key, value in config.items():
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == ENTRY_MODULE and value[1] in classes:
            config[key] = value[1] if key == "_class_name" else [classes[value[1]].__module__, value[1]]
    return config
