"""Every fenced code block of README.md runs, in order, on tiny backbones, so the README cannot rot.

Python blocks share one namespace (like a notebook) and bash blocks run their ``gill-hf`` lines through the CLI,
all in one folder holding tiny stand-ins for the files the README names (dog.jpg, a CC3M TSV, VIST stories, a
release checkpoint at tiny widths). Real Hub ids are replaced by the tiny backbones, long runs by short ones
(``SPEED``), and the Hub by the local fake Hub. The first block (install + quickstart, the test command) is
checked against .ci/run and the CLI parser; the quickstart itself runs in test_quickstart.py, which also checks
the labels of the README's sample of its printed summary (the ``text`` block).
"""

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from eval_fixtures import (
    stub_alexnet_weights,
    stub_inception_weights,
    write_coco_captions,
    write_visdial,
    write_vist,
)

from gill_hf import GILLForConditionalGeneration, GILLProcessor, RetrievalIndex
from gill_hf.cli import build_parser
from gill_hf.cli import main as cli_main
from gill_hf.tiny import build_tiny_release
from gill_hf.toy_world import shape_corpus
from gill_hf.toy_world import write_toy_cc3m, write_toy_vist

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SPEED = {"max_steps=20_000": "max_steps=2", "num_inference_steps=50": "num_inference_steps=2",
         "per_device_train_batch_size=20": "per_device_train_batch_size=2",
         "--seeds 0 1 2 3 4": "--seeds 0 --steps 2 --limit 2", "--sample 30000": "--sample 3 --steps 2"}
SHARED_DATA = Path("/work/shared/data/gill-release")


def readme_blocks() -> list[tuple[str, str]]:
    """``(language, code)`` of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"^```(\w*)\n(.*?)^```", README.read_text(), re.S | re.M)]


def bash_commands(code: str) -> list[str]:
    """The command lines of a bash block, continuation lines joined, comments left out."""
    lines = (line.strip() for line in code.replace("\\\n", " ").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def substitute(code: str, names: dict[str, str]) -> str:
    for old, new in {**names, **SPEED}.items():
        code = code.replace(old, new)
    return code


@pytest.fixture
def readme_folder(tmp_path, tiny_backbones, monkeypatch):
    """A working folder with every file the README's blocks read."""
    shape_corpus(1, seed=1, size=48)[0][0].save(tmp_path / "dog.jpg")
    (tmp_path / "cc3m_train.tsv").write_text(Path(write_toy_cc3m(tmp_path / "cc3m", 8)).read_text()
                                             .replace("images/", "cc3m/images/"))
    vist = Path(write_toy_vist(tmp_path / "vist_images", num_stories=2, steps=3))
    (tmp_path / "sis").mkdir()
    vist.rename(tmp_path / "sis" / "train.story-in-sequence.json")
    build_tiny_release(tmp_path, tiny_backbones)
    annotations, images = map(Path, write_vist(tmp_path / "vist_eval"))
    annotations.rename(tmp_path / "sis" / "val.story-in-sequence.json")
    images.rename(tmp_path / "sis" / "val_images")
    annotations, images = map(Path, write_visdial(tmp_path))
    images.rename(tmp_path / "VisualDialog_val2018")
    captions = Path(write_coco_captions(tmp_path))
    (tmp_path / "annotations").mkdir()
    captions.rename(tmp_path / "annotations" / "captions_val2014.json")
    (tmp_path / "coco").rename(tmp_path / "val2014")
    for name in ("PartiPromptsDecisionsConfident.tsv", "PartiPromptsAllDecisions_Alignment.tsv"):
        shutil.copy(SHARED_DATA / name, tmp_path / name)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # metric weights: random stand-ins, offline
    stub_alexnet_weights(str(tmp_path / "torch_home"))
    stub_inception_weights(str(tmp_path / "torch_home"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_first_block_is_what_ci_runs():
    lang, code = readme_blocks()[0]
    install_and_run, test_command = bash_commands(code)
    ci_lines = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line and not line.startswith("#")]
    assert lang == "bash" and ci_lines[-1] == test_command == "python -m pytest -q"
    install, editable, quickstart = install_and_run.split(" && ")
    assert install.replace("pip install", "python -m pip install --quiet") in ci_lines
    assert editable.replace("pip install", "python -m pip install --quiet") in ci_lines
    args = build_parser().parse_args(shlex.split(quickstart)[1:])
    assert args.func.__module__ == "gill_hf.commands.quickstart" and args.out == "gill-quickstart"


def test_every_readme_block_runs(readme_folder, tiny_backbones, fake_hub, single_thread, capsys, monkeypatch):
    import gradio

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry to the (fake) Hub
    launched = []  # `gill-hf demo` builds the real Blocks; serving it is test_web_demo.py's job
    monkeypatch.setattr(gradio.Blocks, "launch", lambda self, **kwargs: launched.append((self, kwargs)))
    names = {"facebook/opt-6.7b": tiny_backbones["opt"], "openai/clip-vit-large-patch14": tiny_backbones["clip"],
             "stable-diffusion-v1-5/stable-diffusion-v1-5": tiny_backbones["sd"]}
    namespace: dict = {}
    ran = {"python": 0, "bash": 0}
    for lang, code in readme_blocks()[1:]:
        code = substitute(code, names)
        if lang == "text":  # printed output shown to the reader, not code
            continue
        if lang == "python":
            exec(compile(code, f"README.md ({lang} block)", "exec"), namespace)
        else:
            assert lang == "bash", f"README block in {lang!r}: the test knows python and bash"
            for command in bash_commands(code):
                argv = shlex.split(command)
                assert argv[0] == "gill-hf", f"README bash block runs {argv[0]!r}; only gill-hf commands are tested"
                assert cli_main(argv[1:]) == 0, command
        ran[lang] += 1
    assert ran["python"] >= 5 and ran["bash"] >= 3

    # What the blocks claim, checked on what they left behind.
    assert (readme_folder / "gill-original" / "retrieval_index").is_dir()
    assert len(namespace["index"]) == 5 and len(namespace["pipe"].retrieval_index) == 1 and namespace["answer"].images
    assert namespace["prompt_embeds"].shape[1:] == (77, 32)  # one (L, D) per [IMG] block of the answer
    assert (readme_folder / "answer.html").read_text().count("<img") >= 2
    assert (readme_folder / "runs" / "minigpt5-stage2" / "lora" / "adapter_model.safetensors").is_file()
    vist = json.loads((readme_folder / "eval" / "vist" / "results.json").read_text())
    assert vist and (readme_folder / "eval" / "visdial" / "context_curve.png").is_file()
    decision = json.loads((readme_folder / "eval" / "decision" / "results.json").read_text())
    assert "always_generate" in json.dumps(decision)
    pushed = fake_hub.repos["your-name/gill-opt-6.7b"].files()
    assert {"model.safetensors", "config.json", "README.md"} <= set(pushed)
    assert "5 retrieval candidates" in capsys.readouterr().out
    [(blocks, kwargs)] = launched
    assert isinstance(blocks, gradio.Blocks) and kwargs == {"share": False, "server_name": "127.0.0.1",
                                                            "server_port": 7860}
    assert namespace["scores"].shape == (3,), namespace["scores"]
    built = RetrievalIndex.load(readme_folder / "my-image-index")
    assert len(built) == len(list((readme_folder / "val2014").iterdir()))
    assert (readme_folder / "my-image-index" / "faiss.index").is_file()
    # gill_hf installed: the Auto classes keep its own classes (test_remote_code.py loads the pushed code without it)
    assert type(namespace["remote"]) is GILLForConditionalGeneration and isinstance(namespace["remote_processor"],
                                                                                     GILLProcessor)
