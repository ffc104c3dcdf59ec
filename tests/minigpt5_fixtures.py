"""Offline stand-ins and official-format files for MiniGPT-5's benchmarks: a tiny open_clip with a text tower, a
tiny SentenceTransformer, a WordNet stand-in, exported Inception-like feature / classifier modules, a CC3M TSV and an
MMDialog JSONL with images."""

import json
import os

import numpy as np
import torch
from PIL import Image

TINY_OPEN_CLIP = {"embed_dim": 16,
                  "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
                  "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
TINY_CLIP_NAME = "gill-tiny-clip-t"
WORDS = "the a we saw then red blue green circle square star park beach dog hound sat on mat big at of".split()


def register_tiny_open_clip(root) -> str:
    """Registers the tiny open_clip config (open_clip's bundled BPE tokenizer) and saves random weights as a
    safetensors file; the CLI name ``open_clip:<arch>/<weights file>``."""
    import open_clip
    from safetensors.torch import save_file

    path = os.path.join(root, f"{TINY_CLIP_NAME}.json")
    with open(path, "w") as f:
        json.dump(TINY_OPEN_CLIP, f)
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    weights = os.path.join(root, f"{TINY_CLIP_NAME}.safetensors")
    save_file({k: v.contiguous() for k, v in open_clip.create_model(TINY_CLIP_NAME).state_dict().items()}, weights)
    return f"open_clip:{TINY_CLIP_NAME}/{weights}"


def build_tiny_sbert(root) -> str:
    """A SentenceTransformer (tiny random BERT + mean pooling) saved to a folder; its path."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules
    from transformers import BertConfig, BertModel, BertTokenizerFast

    bert = os.path.join(root, "bert")
    os.makedirs(bert, exist_ok=True)
    vocab = os.path.join(root, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(WORDS) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=64)).save_pretrained(bert)
    BertTokenizerFast(vocab_file=vocab).save_pretrained(bert)
    out = os.path.join(root, "sbert")
    SentenceTransformer(modules=[modules.Transformer(bert), modules.Pooling(16, "mean")], device="cpu").save(out)
    return out


class _Lemma:
    def __init__(self, name):
        self._name = name

    def name(self):
        return self._name


class _Synset:
    def __init__(self, names):
        self.names = names

    def lemmas(self):
        return [_Lemma(name) for name in self.names]


class StandInWordNet:
    """nltk's ``synsets(word)`` over a fixed synonym table ("dog" ~ "hound"), enough for METEOR's synonym stage."""

    SYNONYMS = [("dog", "hound"), ("big", "large")]

    def synsets(self, word, *args, **kwargs):
        return [_Synset(list(pair)) for pair in self.SYNONYMS if word in pair]


class ChannelMeans(torch.nn.Module):
    """FID features: uint8 (N, 3, H, W) -> (N, 3) mean colour."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.float().mean(dim=(2, 3)) / 255.0


class ColourLogits(torch.nn.Module):
    """An Inception-Score classifier: (N, 3, H, W) uint8 -> (N, 4) logits from the mean colour."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor([[4.0, -2.0, 1.0], [-3.0, 5.0, 0.5], [1.0, 1.0, -4.0],
                                                       [0.0, -1.0, 3.0]]), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images.float().mean(dim=(2, 3)) / 255.0) @ self.weight.T


def export_module(module: torch.nn.Module, path: str) -> str:
    example = torch.zeros(2, 3, 299, 299, dtype=torch.uint8)
    torch.export.save(torch.export.export(module, (example,), dynamic_shapes=({0: torch.export.Dim("n")},)), path)
    return path


def _image(rng: np.random.Generator, size: int = 40) -> Image.Image:
    """A random two-colour image (different per call)."""
    array = np.empty((size, size, 3), dtype=np.uint8)
    array[:] = rng.integers(0, 256, 3)
    array[size // 2:] = rng.integers(0, 256, 3)
    return Image.fromarray(array)


def write_cc3m(root, num_images: int = 4) -> tuple[str, str]:
    """The GILL release's CC3M layout: ``caption<TAB>image`` TSV with a header, images beside it."""
    folder = os.path.join(root, "cc3m")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(5)
    lines = ["caption\timage"]
    for i in range(num_images):
        name = f"{i:09d}.jpg"
        _image(rng).save(os.path.join(folder, name), quality=95)
        lines.append(f"a {WORDS[5 + i % 3]} {WORDS[8 + i % 3]} in the park\t{name}")
    path = os.path.join(folder, "cc3m_val.tsv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, folder


MMDIALOG_TURNS = [
    [("we saw a dog at the park", "101"), ("a big dog", None), ("then a red circle", "102")],
    [("the beach", None), ("a blue square on the mat", "103")],
]


def write_mmdialog(root) -> tuple[str, str]:
    """MMDialog JSONL (one conversation per line, ``__TEXT__`` / ``__MEDIA__`` parts) + ``<media id>.jpg``."""
    folder = os.path.join(root, "mmdialog")
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(6)
    lines = []
    for c, turns in enumerate(MMDIALOG_TURNS):
        conversation = []
        for text, media in turns:
            parts = [{"__TEXT__": text}]
            if media is not None:
                _image(rng).save(os.path.join(folder, f"{media}.jpg"), quality=95)
                parts.append({"__MEDIA__": media})
            conversation.append({"turn": parts})
        lines.append(json.dumps({"conversation_id": 300 + c, "conversation": conversation}))
    path = os.path.join(folder, "test_conversations.txt")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, folder


def part_values(parts: list) -> list:
    """Interleaved parts as comparable values: texts as they are, images as (size, RGB bytes)."""
    return [part if isinstance(part, str) else (part.size, part.convert("RGB").tobytes()) for part in parts]


def as_context_image(image: Image.Image) -> Image.Image:
    """A training item's image as the evaluations feed it (``contexts.context_image``'s size and resampling)."""
    from gill_hf.evaluation.contexts import CONTEXT_IMAGE_SIZE

    return image.convert("RGB").resize((CONTEXT_IMAGE_SIZE, CONTEXT_IMAGE_SIZE), Image.BICUBIC)


def minigpt5_training_prompt(example: dict, collator) -> tuple[str, list, list[int]]:
    """What stage-2 training feeds for a VIST / MMDialog dataset item, built independently of the evaluation:
    (MiniGPT-5's prompt string from ``chat_templates``, its images in placeholder order, the prompt's ids in the
    ``prompt_format="minigpt5"`` collator's row, i.e. the row minus the answer it appends)."""
    from gill_hf.chat_templates import MINIGPT5_STOP, minigpt5_dialogue_prompt, minigpt5_story_prompt

    if example["task"] == "dialogue":
        text = minigpt5_dialogue_prompt([(t["role"], t["text"], t["has_image"]) for t in example["turns"]],
                                        example["role"])
    else:
        text = minigpt5_story_prompt([p for p in example["context"] if isinstance(p, str)], example["instruction"],
                                     example["instruction_image"] is not None)
    images = [p for p in example["context"] if not isinstance(p, str)] + \
        ([example["instruction_image"]] if example["instruction_image"] is not None else [])
    tok, processor = collator.processor.tokenizer, collator.processor
    answer = (tok(" " + example["target_text"], add_special_tokens=False)["input_ids"] if example["target_text"]
              else []) + (processor.img_token_ids if example["output_image"] is not None else []) + \
        tok(" " + MINIGPT5_STOP, add_special_tokens=False)["input_ids"]
    row = collator([example])["input_ids"][0].tolist()
    assert row[len(row) - len(answer):] == answer
    return text, images, row[:len(row) - len(answer)]
