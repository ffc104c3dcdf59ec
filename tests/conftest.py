"""Shared fixtures: tiny offline backbones (built once per session) and small GILL models on top of them."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from hub_server import FakeHub  # noqa: E402
from huggingface_hub import constants, hf_api  # noqa: E402
from transformers.utils import hub as transformers_hub  # noqa: E402

from gill_hf import GILLForConditionalGeneration, GILLPipeline, build_tiny_backbones  # noqa: E402
from gill_hf.tiny import build_tiny_diffusion  # noqa: E402

torch.set_num_threads(2)

# A paper-shaped GILL (k=4, r=8, p=256, 4+4 mapper layers, L=77) scaled down in width so tests stay fast.
SMALL_MAPPER = dict(mapper_hidden_dim=32, mapper_num_heads=4, mapper_ffn_dim=64, mapper_encoder_layers=2,
                    mapper_decoder_layers=2)


def seeded(n: int = 0) -> torch.Generator:
    """A CPU generator seeded with ``n`` (diffusion noise in pixel-equality tests)."""
    return torch.Generator().manual_seed(n)


def gill_on(tiny_backbones, diffusion: str, **overrides):
    """A seeded GILL model (SMALL_MAPPER) on the tiny OPT + CLIP and a diffusion folder, its layout recorded, in eval
    mode."""
    torch.manual_seed(0)
    return GILLForConditionalGeneration.from_backbones(tiny_backbones["opt"], tiny_backbones["clip"], diffusion,
                                                       **SMALL_MAPPER, **overrides).eval()


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models run many small ops: one thread avoids OpenMP stalls on a shared machine (restored after)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory) -> dict[str, str]:
    """Paths of the tiny random OPT (tied), Llama (untied), CLIP vision and Stable Diffusion checkpoints."""
    return build_tiny_backbones(tmp_path_factory.mktemp("backbones"))



class _TinyDiffusion(dict):
    def __init__(self, root):
        super().__init__()
        self.root = root

    def __missing__(self, kind: str) -> str:
        self[kind] = build_tiny_diffusion(self.root, kind)
        return self[kind]


@pytest.fixture(scope="session")
def tiny_diffusion(tmp_path_factory) -> dict:
    """``tiny_diffusion["sd2" | "sdxl" | "sd3" | "flux"]``: a tiny diffusers folder of that family, built on first use."""
    return _TinyDiffusion(tmp_path_factory.mktemp("diffusion"))

@pytest.fixture(scope="session")
def make_model(tiny_backbones):
    """``make_model(llm="opt", seed=0, **config_overrides)`` -> a fresh GILL with its processor attached."""

    def _make(llm: str = "opt", seed: int = 0, **overrides) -> GILLForConditionalGeneration:
        torch.manual_seed(seed)
        kwargs = {**SMALL_MAPPER, **overrides}
        return GILLForConditionalGeneration.from_backbones(tiny_backbones[llm], tiny_backbones["clip"],
                                                           tiny_backbones["sd"], **kwargs)

    return _make


@pytest.fixture
def caption_batch():
    """``batch(model, n, seed, texts, max_length)``: n toy image-caption pairs (the fixture's captions unless
    ``texts``) encoded by the model's processor, plus random targets."""
    from PIL import Image

    captions = ["a red circle on the left", "a blue square at the top", "a yellow star in the middle",
                "a green triangle at the bottom", "a purple ring in the corner", "a white cross on the right"]
    colours = ["red", "blue", "yellow", "green", "purple", "white"]

    def _batch(model, n: int = 4, seed: int = 0, texts: list[str] | None = None, max_length: int = 24) -> dict:
        proc = model.processor
        enc = proc.encode_captions((texts or captions)[:n], max_length=max_length)
        images = [Image.new("RGB", (40, 36), colour) for colour in colours[:n]]
        g = torch.Generator().manual_seed(seed)
        targets = torch.randn(n, model.config.num_gen_queries, model.config.gen_emb_dim, generator=g)
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "pixel_values": proc.preprocess_images(images), "gen_targets": targets}

    return _batch


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """A FakeHub with the real client pointed at it; every patched global is restored at module teardown."""
    with FakeHub() as hub, pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_ENDPOINT", hub.endpoint)
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.setenv("HF_TOKEN", hub.token)
        mp.setattr(constants, "ENDPOINT", hub.endpoint)
        mp.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf_cache")))
        mp.setattr(transformers_hub, "_hf_api", None)  # transformers caches an HfApi bound to the old endpoint
        mp.setattr(hf_api.api, "endpoint", hub.endpoint)  # the module-level HfApi behind file_exists (peft)
        yield hub
        assert hub.server_errors == []
        assert hub.unknown_requests == [], f"client used endpoints the fake Hub does not know: {hub.unknown_requests}"


@pytest.fixture(scope="module")
def pipe(make_model):
    """A GILLPipeline on the tiny OPT model (random adapter), progress bars off; one per test module."""
    pipeline = GILLPipeline.from_gill(make_model("opt").eval())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
