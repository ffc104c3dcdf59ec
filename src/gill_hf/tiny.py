"""Tiny random backbones written with ``save_pretrained``, so tests and demos run offline through real loaders.

``build_tiny_backbones(out_dir)`` writes::

    out_dir/opt/     OPTForCausalLM (tied output embeddings) + byte-level BPE tokenizer
    out_dir/llama/   LlamaForCausalLM (untied output embeddings) + the same tokenizer
    out_dir/clip/    CLIPVisionModel + CLIPImageProcessor (32 x 32 px)
    out_dir/sd/      Stable Diffusion folder: unet, vae, text_encoder, tokenizer, scheduler, model_index.json

Widths are small (LLM 64, CLIP 32, SD text 32) and all weights are seeded, so two calls give identical files.
"""

import functools
import json
import os
import tempfile
from pathlib import Path

import torch

TINY_CORPUS_WORDS = (
    "a an the of on in at to and with is are this that photo picture image drawing painting of my dog cat "
    "red green blue yellow purple orange white black gray pink circle square triangle star ring cross "
    "small big large tiny left right top bottom middle center corner next beach park street city house "
    "man woman child people tree flower sky water sun moon car bus train show me same here there it "
    "story day we went saw had fun then after finally first one two three four five . , ! ? : ' Q A"
).split()


def _bytes_to_unicode() -> list[str]:
    """The GPT-2 byte -> printable-character table that byte-level BPE vocabularies are written in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) \
        + list(range(ord("®"), ord("ÿ") + 1))
    codes, extra = printable[:], 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_tiny_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer (any text encodes, no unknowns) trained on a toy corpus; bos ``<s>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    sentences = [" ".join(TINY_CORPUS_WORDS[i:i + 6]) for i in range(len(TINY_CORPUS_WORDS))]
    tok.train_from_iterator(sentences * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


TINY_CHAT_TEMPLATE = (  # Llama-3's layout: BOS, then one header + content + end-of-turn per message
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif -%}"
)


def build_tiny_chat_tokenizer(model_max_length: int = 512):
    """``build_tiny_tokenizer`` as an instruct LLM's: Llama-3-style header / end-of-turn special tokens, a chat
    template using them (``TINY_CHAT_TEMPLATE``) and a context window of ``model_max_length`` tokens."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>"]})
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _build_clip_text_tokenizer():
    """A character-level CLIPTokenizer (the SD tokenizer class) from hand-written vocab/merges files."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = os.path.join(tmp, "vocab.json"), os.path.join(tmp, "merges.txt")
        Path(vocab_file).write_text(json.dumps(vocab))
        Path(merges_file).write_text("#version: 0.2\n")
        tokenizer = CLIPTokenizer(vocab_file, merges_file, model_max_length=77)
    return tokenizer


def tiny_llm_config(kind: str, vocab_size: int):
    """Config of a 2-layer, 64-wide OPT (tied) or Llama (untied) model."""
    from transformers import LlamaConfig, OPTConfig

    if kind == "opt":
        return OPTConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                         num_attention_heads=4, max_position_embeddings=512, word_embed_proj_dim=64,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, dropout=0.0, attention_dropout=0.0,
                         tie_word_embeddings=True)
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                           pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    raise ValueError(f"unknown tiny LLM kind {kind!r}; expected 'opt' or 'llama'")


def tiny_clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)


def tiny_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})


def _save_llm(kind: str, out_dir: Path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_llm_config(kind, len(tokenizer)))
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _save_clip(out_dir: Path):
    from transformers import CLIPVisionModel

    CLIPVisionModel(tiny_clip_vision_config()).save_pretrained(out_dir)
    tiny_image_processor().save_pretrained(out_dir)


def _tiny_text_config(tokenizer, width: int = 32):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=512, eos_token_id=513, pad_token_id=513)


def _tiny_denoising_parts(cross_attention_dim: int, prediction_type: str = "epsilon", **unet_kwargs):
    """The tiny UNet (extra ``unet_kwargs``: SDXL's), VAE and DDIM scheduler every tiny diffusion folder shares."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    unet = UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, norm_num_groups=8, attention_head_dim=4, **unet_kwargs)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=8, sample_size=32)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return unet, vae, scheduler


def _save_stable_diffusion(out_dir: Path, text_width: int = 32, prediction_type: str = "epsilon"):
    """SD 1.x layout (defaults) or, with another ``text_width`` and ``"v_prediction"``, SD 2.x's."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    tokenizer = _build_clip_text_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer, text_width))
    unet, vae, scheduler = _tiny_denoising_parts(text_width, prediction_type)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)


def build_tiny_backbones(out_dir: str | os.PathLike, seed: int = 0) -> dict[str, str]:
    """Write tiny random OPT, Llama, CLIP-vision and Stable Diffusion checkpoints; return their paths by name.

    Folders that already hold a ``config.json`` / ``model_index.json`` are reused, so the call is cheap to repeat.
    """
    out = Path(out_dir)
    paths = {"opt": out / "opt", "llama": out / "llama", "clip": out / "clip", "sd": out / "sd"}
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = None
    for name, path in paths.items():
        marker = path / ("model_index.json" if name == "sd" else "config.json")
        if marker.exists():
            continue
        torch.manual_seed(seed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out))
        if name in ("opt", "llama"):
            tokenizer = tokenizer or build_tiny_tokenizer()
            _save_llm(name, tmp, tokenizer)
        elif name == "clip":
            _save_clip(tmp)
        else:
            _save_stable_diffusion(tmp)
        os.replace(tmp, path)  # a crash leaves no half-written backbone behind
    return {name: str(path) for name, path in paths.items()}


def _save_stable_diffusion_xl(out_dir: Path):
    """SDXL layout: two text encoders (widths 32 + 32 -> sequence 64, pooled 32), a ``text_time`` UNet."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _build_clip_text_tokenizer()
    text_encoder = CLIPTextModel(_tiny_text_config(tokenizer))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(tokenizer))
    unet, vae, scheduler = _tiny_denoising_parts(
        64, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
                                     add_watermarker=False)
    pipe.save_pretrained(out_dir)


TINY_DIFFUSION_FAMILIES = {  # name -> builder of a tiny diffusers folder of that layout
    "sd2": functools.partial(_save_stable_diffusion, text_width=48, prediction_type="v_prediction"),
    "sdxl": _save_stable_diffusion_xl,
}


def build_tiny_diffusion(out_dir: str | os.PathLike, kind: str, seed: int = 0) -> str:
    """Write (or reuse) a tiny random diffusers folder of another layout than SD 1.x's ``sd`` backbone:
    ``"sd2"`` (text width 48, v-prediction) or ``"sdxl"`` (sequence 64, pooled 32). Returns its path."""
    if kind not in TINY_DIFFUSION_FAMILIES:
        raise ValueError(f"unknown tiny diffusion kind {kind!r}; expected one of {sorted(TINY_DIFFUSION_FAMILIES)}")
    path = Path(out_dir) / kind
    if not (path / "model_index.json").exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=path.parent))
        TINY_DIFFUSION_FAMILIES[kind](tmp)
        os.replace(tmp, path)  # a crash leaves no half-written model behind
    return str(path)


def build_tiny_release(out_dir: str | os.PathLike, backbones: dict[str, str], num_candidates: int = 5,
                       seed: int = 0) -> dict[str, str]:
    """Write stand-ins for the original GILL release files at the tiny backbones' widths (random values):
    ``pretrained_ckpt.pth.tar``, ``model_args.json``, ``decision_model.pth.tar``, ``cc3m_embeddings_urls.npy``.

    Same formats as the release (tensor pickles via ``torch.save``, a pickled dict of numpy arrays), so
    ``gill-hf convert-original`` runs on them offline. Returns the file paths by name.
    """
    import pickle

    import numpy as np
    from transformers import AutoTokenizer, CLIPImageProcessor

    from .convert_original import RELEASE_FILES, config_from_model_args, release_key_shapes
    from .processing_gill import GILLProcessor

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    probe = GILLProcessor(CLIPImageProcessor.from_pretrained(backbones["clip"]),
                          AutoTokenizer.from_pretrained(backbones["opt"]))
    text_width = json.loads((Path(backbones["sd"]) / "text_encoder" / "config.json").read_text())["hidden_size"]
    model_args = {"opt_version": backbones["opt"], "freeze_lm": True, "visual_encoder": backbones["clip"],
                  "freeze_vm": True, "n_visual_tokens": 4, "ret_emb_dim": 256, "gen_emb_dim": text_width,
                  "text_emb_layers": [-1], "text_fc_mode": "gill_mapper", "ret_text_fc_mode": "linear",
                  "num_tokens": 8, "num_clip_tokens": 77, "share_ret_gen": True, "norm_image_embed": "none",
                  "retrieval_token_idx": probe.img_token_ids, "gen_token_idx": probe.img_token_ids}
    config = config_from_model_args(model_args)
    g = torch.Generator().manual_seed(seed)
    state = {k: (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
             for k, shape in release_key_shapes(config).items()}
    decision = {"1.weight": 0.02 * torch.randn(2, config.llm_feature_dim, generator=g), "1.bias": torch.zeros(2)}
    rng = np.random.default_rng(seed)
    embeddings = {"paths": [f"https://example.com/{i}.jpg" for i in range(num_candidates)],
                  "embeddings": [rng.standard_normal(256).astype(np.float32) for _ in range(num_candidates)]}
    paths = {name: str(out / file) for name, file in RELEASE_FILES.items()}
    Path(paths["model_args"]).write_text(json.dumps(model_args, indent=1))
    torch.save({"state_dict": state}, paths["checkpoint"])
    torch.save({"state_dict": decision}, paths["decision"])
    with open(paths["embeddings"], "wb") as handle:
        pickle.dump(embeddings, handle)
    return paths
