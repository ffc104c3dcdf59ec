"""Tiny random backbones written with ``save_pretrained``, so tests and demos run offline through real loaders.

``build_tiny_backbones(out_dir)`` writes::

    out_dir/opt/     OPTForCausalLM (tied output embeddings) + byte-level BPE tokenizer
    out_dir/llama/   LlamaForCausalLM (untied output embeddings) + the same tokenizer
    out_dir/clip/    CLIPVisionModel + CLIPImageProcessor (32 x 32 px)
                     (``build_tiny_vision_encoder``: SigLIP vision and a BLIP-2 checkpoint, 32 x 32 px too)
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


def tiny_siglip_vision_config():
    from transformers import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8)


def tiny_blip2_config():
    """A BLIP-2 of the tiny widths: vision 32 (CLIP's layout), Q-Former 48 with 6 queries, a 16-wide OPT."""
    from transformers import Blip2Config, Blip2QFormerConfig, Blip2VisionConfig, OPTConfig

    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                 encoder_hidden_size=32, vocab_size=64, max_position_embeddings=64)
    text = OPTConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                     max_position_embeddings=64, word_embed_proj_dim=16)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                       num_query_tokens=6)


def _save_siglip(out_dir: Path):
    from transformers import SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    SiglipVisionModel(tiny_siglip_vision_config()).save_pretrained(out_dir)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out_dir)


def _save_blip2(out_dir: Path):
    """A whole ``Blip2ForConditionalGeneration`` (language model included), as BLIP-2 checkpoints are published."""
    from transformers import Blip2ForConditionalGeneration
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    model = Blip2ForConditionalGeneration(tiny_blip2_config())
    with torch.no_grad():
        model.query_tokens.normal_(std=0.5)  # BLIP-2 initialises them to zero: every query would be the same
    model.save_pretrained(out_dir)
    BlipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(out_dir)


TINY_VISION_ENCODERS = {"siglip": _save_siglip, "blip2": _save_blip2}  # name -> builder of a tiny vision folder


def build_tiny_vision_encoder(out_dir: str | os.PathLike, kind: str, seed: int = 0) -> str:
    """Write (or reuse) a tiny random vision folder besides ``clip``: ``"siglip"`` (SiglipVisionModel, 16 patches)
    or ``"blip2"`` (a BLIP-2 checkpoint: vision 32 wide, Q-Former 48 wide, 6 queries). Returns its path."""
    return _build_once(out_dir, kind, TINY_VISION_ENCODERS, "config.json", seed, "tiny vision encoder")


def _build_once(out_dir, kind: str, builders: dict, marker: str, seed: int, what: str) -> str:
    """``out_dir/kind`` written by ``builders[kind]`` unless its ``marker`` file exists; staged in a temporary folder
    and renamed, so a crash leaves no half-written model behind."""
    if kind not in builders:
        raise ValueError(f"unknown {what} {kind!r}; expected one of {sorted(builders)}")
    path = Path(out_dir) / kind
    if not (path / marker).exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(seed)
        tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=path.parent))
        builders[kind](tmp)
        os.replace(tmp, path)
    return str(path)


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


def _build_t5_tokenizer():
    """A T5 (unigram) tokenizer over the tiny corpus words, single characters as the fallback pieces."""
    from transformers import T5TokenizerFast

    words = sorted(set(TINY_CORPUS_WORDS))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0) for w in words] \
        + [(c, -5.0) for c in sorted(set("".join(words)) | set("abcdefghijklmnopqrstuvwxyz\u2581"))]
    return T5TokenizerFast(vocab=vocab, extra_ids=0)


def _tiny_t5(tokenizer, width: int):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=64, num_layers=1,
                                   num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


def _tiny_flow_vae(scaling_factor: float, shift_factor: float):
    """SD3 / Flux's VAE kind: 16 latent channels, a shift as well as a scale, no quant convs."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=8, sample_size=32, scaling_factor=scaling_factor, shift_factor=shift_factor,
                         use_quant_conv=False, use_post_quant_conv=False)


def _save_stable_diffusion_3(out_dir: Path):
    """SD3 layout: CLIP-L + CLIP-G (32 + 32, zero-padded to T5's 96) + T5 -> sequence 77 + 256 by 96, pooled 64."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer, t5_tokenizer = _build_clip_text_tokenizer(), _build_t5_tokenizer()
    text_encoders = [CLIPTextModelWithProjection(_tiny_text_config(tokenizer)) for _ in range(2)]
    transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=1,
                                        attention_head_dim=8, num_attention_heads=4, joint_attention_dim=96,
                                        caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=16)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_flow_vae(1.5305, 0.0609), text_encoder=text_encoders[0], tokenizer=tokenizer,
        text_encoder_2=text_encoders[1], tokenizer_2=tokenizer, text_encoder_3=_tiny_t5(t5_tokenizer, 96),
        tokenizer_3=t5_tokenizer)
    pipe.save_pretrained(out_dir)


def _save_flux(out_dir: Path):
    """Flux layout: T5 (48 wide, 512 tokens) sequence, CLIP (32) pooled, a guidance-embedding transformer over
    2 x 2-packed 16-channel latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    tokenizer, t5_tokenizer = _build_clip_text_tokenizer(), _build_t5_tokenizer()
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=48,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_tiny_flow_vae(0.3611, 0.1159),
                        text_encoder=CLIPTextModel(_tiny_text_config(tokenizer)), tokenizer=tokenizer,
                        text_encoder_2=_tiny_t5(t5_tokenizer, 48), tokenizer_2=t5_tokenizer)
    pipe.save_pretrained(out_dir)


TINY_DIFFUSION_FAMILIES = {  # name -> builder of a tiny diffusers folder of that layout
    "sd2": functools.partial(_save_stable_diffusion, text_width=48, prediction_type="v_prediction"),
    "sdxl": _save_stable_diffusion_xl,
    "sd3": _save_stable_diffusion_3,
    "flux": _save_flux,
}


def build_tiny_diffusion(out_dir: str | os.PathLike, kind: str, seed: int = 0) -> str:
    """Write (or reuse) a tiny random diffusers folder of another layout than SD 1.x's ``sd`` backbone:
    ``"sd2"`` (text width 48, v-prediction), ``"sdxl"`` (sequence 64, pooled 32), ``"sd3"`` (sequence 333 x 96,
    pooled 64, flow matching) or ``"flux"`` (sequence 512 x 48, pooled 32, guidance embedding). Returns its path."""
    return _build_once(out_dir, kind, TINY_DIFFUSION_FAMILIES, "model_index.json", seed, "tiny diffusion kind")


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
