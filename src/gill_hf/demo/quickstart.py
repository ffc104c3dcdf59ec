"""The quickstart: the whole GILL method on tiny offline backbones, measured on held-out toy data, on a CPU.

:func:`run_quickstart` runs these steps (each a function here) and returns the numbers it writes to
``report.json``:

1. tiny backbones (random OPT, CLIP, Stable Diffusion; 32 x 32 images, text-encoder targets 77 x 32);
2. a shapes corpus: ``eval_size`` scenes are held out (never seen in training) and hold the retrieval index, the
   rest make ``train_size`` training pairs; short stories run over the held-out scenes;
3. diffusion text-encoder targets precomputed into target stores;
4. the adapter trained with the HF ``Trainer`` on Eq. 5's four losses;
5. a retrieval index over the held-out images;
6. the decision head fit on "exact corpus caption -> retrieve" vs "something the corpus never draws -> generate";
7. the pipeline answering held-out stories (text + retrieved or generated images, with the decision);
8. the adapter saved with a model card, reloaded, and checked to answer bitwise identically.
"""

import os
import random
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch

from ..decision import decide, retrieve_probabilities
from ..generation_gill import generate_interleaved, image_conditioning
from ..hub import build_model_card
from ..modeling_gill import GILLForConditionalGeneration, count_adapter_parameters
from ..pipeline_gill import GILLPipeline
from ..retrieval import RetrievalIndex
from ..tiny import build_tiny_backbones
from ..toy_data import all_scenes, draw_shape, novel_prompts, scene_caption, shape_stories
from ..training import CaptionImageDataset, DiffusionTextEncoder, TargetStore, precompute_targets, train_gill
from ..training.decision_training import prompt_features, train_decision_head
from . import measures
from .report import results_rows, summary_text, write_file_atomic, write_reports

MAPPER = dict(mapper_hidden_dim=64, mapper_num_heads=4, mapper_ffn_dim=128, mapper_encoder_layers=2,
              mapper_decoder_layers=2)
IMAGE_SIZE = 64  # px of the drawn toy images (CLIP resizes them to 32)


@dataclass
class QuickstartSettings:
    """Sizes and optimisation settings; the defaults finish in a few minutes on 2 CPU cores."""

    steps: int = 900  # optimizer steps of the adapter
    train_size: int = 512  # training pairs, drawn from the scenes not held out
    eval_size: int = 24  # held-out scenes (distinct; they also make the retrieval index)
    batch_size: int = 32
    lr: float = 3e-3  # peak; cosine decay to 0
    seed: int = 0
    logging_steps: int = 25
    then_prob: float = 0.5  # share of training captions (and decision prompts) written as a story step "then a ..."
    story_length: int = 3
    num_stories: int = 4
    decision_steps: int = 1000  # full-batch steps of the decision head
    novel_size: int = 48  # "generate" prompts for the decision head (half train, half held out)
    diffusion_steps: int = 8
    guidance_scale: float = 4.0
    num_threads: int = 1  # torch CPU threads while running (tiny models: one thread is fastest on a busy machine)

    def __post_init__(self):
        for name in ("steps", "train_size", "batch_size", "logging_steps", "num_stories", "decision_steps",
                     "diffusion_steps", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 2 <= self.eval_size <= len(all_scenes()) - 2:
            raise ValueError(f"eval_size must lie in [2, {len(all_scenes()) - 2}] (there are {len(all_scenes())} "
                             f"scenes and training needs some), got {self.eval_size}")
        if not 2 <= self.story_length <= self.eval_size:
            raise ValueError(f"story_length must lie in [2, eval_size={self.eval_size}], got {self.story_length}")
        if self.novel_size < 4:
            raise ValueError(f"novel_size must be >= 4, got {self.novel_size}")
        if not 0.0 <= self.then_prob <= 1.0:
            raise ValueError(f"then_prob must lie in [0, 1], got {self.then_prob}")


@dataclass
class ToyData:
    """Captions and PIL images of the split, the held-out images' files (the index's paths) and the stories."""

    train_captions: list
    train_images: list
    heldout_captions: list
    heldout_images: list
    heldout_paths: list
    stories: list  # [[(text, image, scene), ...], ...] over held-out scenes


def as_story_steps(texts: list[str], prob: float, rng: random.Random) -> list[str]:
    """Write each text as a story step ("then a red circle on the left") with probability ``prob``."""
    return [("then " + text) if rng.random() < prob else text for text in texts]


def make_toy_data(settings: QuickstartSettings, out_dir: str) -> ToyData:
    """Hold out ``eval_size`` scenes (saved as PNGs under ``heldout_images/``); sample training pairs from the
    rest (``then_prob`` of their captions written as story steps); stories over the held-out scenes."""
    rng = random.Random(settings.seed)
    scenes = all_scenes()
    rng.shuffle(scenes)
    heldout, seen = scenes[:settings.eval_size], scenes[settings.eval_size:]
    train = [rng.choice(seen) for _ in range(settings.train_size)]
    image_dir = os.path.join(out_dir, "heldout_images")
    os.makedirs(image_dir, exist_ok=True)
    heldout_images = [draw_shape(*scene, size=IMAGE_SIZE) for scene in heldout]
    paths = [os.path.join(image_dir, f"{i:03d}.png") for i in range(len(heldout))]
    for image, path in zip(heldout_images, paths):
        write_file_atomic(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
    train_captions = as_story_steps([scene_caption(s) for s in train], settings.then_prob, rng)
    return ToyData(train_captions, [draw_shape(*s, size=IMAGE_SIZE) for s in train],
                   [scene_caption(s) for s in heldout], heldout_images, paths,
                   shape_stories(heldout, settings.num_stories, settings.story_length, settings.seed, IMAGE_SIZE))


def make_target_stores(captions_by_split: dict, diffusion_path: str, out_dir: str) -> dict:
    """One :class:`TargetStore` per split (``{name: captions}``) of the diffusion text encoder's ``(L, D)``
    outputs, under ``out_dir/targets/<name>``."""
    encoder = DiffusionTextEncoder(diffusion_path)
    stores = {}
    for name, captions in captions_by_split.items():
        folder = precompute_targets(captions, os.path.join(out_dir, "targets", name), encoder, dtype="float32")
        stores[name] = TargetStore(folder)
    return stores


def stacked_targets(store: TargetStore) -> torch.Tensor:
    """All rows of a store, ``(N, L, D)`` float32."""
    return torch.stack([store[i] for i in range(len(store))])


def build_model(paths: dict, seed: int) -> GILLForConditionalGeneration:
    """A fresh GILL adapter (seeded) on the tiny OPT, CLIP and Stable Diffusion."""
    torch.manual_seed(seed)
    return GILLForConditionalGeneration.from_backbones(paths["opt"], paths["clip"], paths["sd"], **MAPPER)


def train_adapter(model, data: ToyData, store: TargetStore, settings: QuickstartSettings, out_dir: str):
    """Train with :func:`train_gill` (HF ``Trainer``, progress bar on); returns the trainer and the loss history
    (one dict per logged step: step, loss and the l_c, l_p, l_g, l_r means since the previous log)."""
    trainer = train_gill(model, CaptionImageDataset(data.train_captions, data.train_images),
                         os.path.join(out_dir, "trainer"), targets=store, max_steps=settings.steps,
                         per_device_train_batch_size=settings.batch_size, learning_rate=settings.lr,
                         logging_steps=settings.logging_steps, use_cpu=True, report_to=[], save_strategy="no",
                         disable_tqdm=False, seed=settings.seed, dataloader_num_workers=0,
                         lr_scheduler_type="cosine")
    trainer.train()
    history = [entry for entry in trainer.state.log_history if "loss" in entry]
    return trainer, history


def heldout_inputs(model, data: ToyData) -> dict:
    """Model inputs of the held-out pairs: input_ids / attention_mask ``(N, T)``, pixel_values ``(N, 3, 32, 32)``."""
    enc = model.processor.encode_captions(data.heldout_captions, max_length=32)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "pixel_values": model.processor.preprocess_images(data.heldout_images)}


def decision_split(data: ToyData, settings: QuickstartSettings) -> dict:
    """Decision prompts with labels (1 = retrieve, 0 = generate): exact corpus captions retrieve (training: the
    seen scenes; held out: the indexed scenes), descriptions the corpus never draws generate."""
    rng = random.Random(settings.seed + 1)
    novel = novel_prompts(settings.novel_size, seed=settings.seed + 1)
    half = settings.novel_size // 2
    seen = sorted({caption.removeprefix("then ") for caption in data.train_captions})
    split = {}
    for name, ret, gen in (("train", seen, novel[:half]), ("heldout", data.heldout_captions, novel[half:])):
        split[name] = (as_story_steps(list(ret) + list(gen), settings.then_prob, rng),
                       torch.tensor([1] * len(ret) + [0] * len(gen)))
    return split


def fit_decision(model, split: dict, settings: QuickstartSettings) -> dict:
    """Fit ``model.adapter.decision_head`` on the training prompts; held-out macro-F1 with its baselines."""
    prompts, labels = split["train"]
    losses = train_decision_head(model.adapter.decision_head, prompt_features(model, prompts), labels,
                                 steps=settings.decision_steps, lr=1e-2, seed=settings.seed)
    prompts, labels = split["heldout"]
    p_retrieve = retrieve_probabilities(model.adapter.decision_head, prompt_features(model, prompts)).cpu()
    scores = measures.decision_scores(p_retrieve, labels, model.config.decision_threshold)
    return {**scores, "final_train_loss": losses[-1],
            "examples": [{"prompt": p, "label": "ret" if y else "gen", "p_retrieve": round(float(q), 4)}
                         for p, y, q in zip(prompts, labels.tolist(), p_retrieve)]}


def story_prompts(data: ToyData, seed: int) -> list[dict]:
    """One prompt per step of each held-out story, answered from the step's own text (stage-1 GILL is trained on
    single captions, and the tiny random LLM does not carry a story's context). Steps describe indexed scenes
    (expect "ret", truth = their image), except the last step of every second story, which asks for something
    the corpus never draws (expect "gen")."""
    novel = novel_prompts(len(data.stories), seed=seed + 2)
    prompts = []
    for i, story in enumerate(data.stories):
        for j, (text, _, scene) in enumerate(story):
            if i % 2 and j == len(story) - 1:
                prompts.append({"story": i, "context": ["then " + novel[i]], "expected": "gen", "truth": None})
            else:
                truth = data.heldout_paths[data.heldout_captions.index(scene_caption(scene))]
                prompts.append({"story": i, "context": [text], "expected": "ret", "truth": truth})
    return prompts


def story_generation_kwargs(model) -> dict:
    """Greedy answers: one image right away (``force_image_after=0``), then a few words of text."""
    return dict(force_image_after=0, max_images=1, max_new_tokens=model.config.num_img_tokens + 6)


def answer_stories(pipe, prompts: list[dict], settings: QuickstartSettings) -> list:
    """Run the pipeline with ``decision="auto"`` on the story prompts -> one list of parts per prompt."""
    out = pipe([p["context"] for p in prompts], decision="auto", num_inference_steps=settings.diffusion_steps,
               guidance_scale=settings.guidance_scale, generator=torch.Generator().manual_seed(settings.seed),
               **story_generation_kwargs(pipe.gill_model))
    return out.parts


def story_scores(prompts: list[dict], answers: list) -> dict:
    """How many story steps got the expected decision, and how many retrievals found the step's own image."""
    images = [next(p for p in parts if not isinstance(p, str)) for parts in answers]
    retrieved = [(image, prompt) for image, prompt in zip(images, prompts) if image.kind == "retrieved"]
    return {"steps": len(prompts),
            "decision_as_expected": sum(image.decision.mode == prompt["expected"]
                                        for image, prompt in zip(images, prompts)),
            "retrieved": len(retrieved), "retrieved_right_image": sum(image.path == prompt["truth"]
                                                                      for image, prompt in retrieved)}


@torch.no_grad()
def model_answers(model, prompts: list[dict], inputs: dict, targets: torch.Tensor, index: RetrievalIndex,
                  settings: QuickstartSettings) -> dict:
    """Everything the reload check compares: story answer token ids, their generation embeddings, retrieval scores
    and P(retrieve), and the held-out forward's text / generation embeddings."""
    encoded = model.processor([p["context"] for p in prompts], padding_side="left")
    generation = generate_interleaved(model, encoded["input_ids"], encoded["attention_mask"],
                                      pixel_values=encoded.get("pixel_values"),
                                      **story_generation_kwargs(model))
    img0 = generation.img0_hidden_states()
    scores, _ = index.search(model.text_retrieval_embeddings(img0), k=len(index))
    forward = measures.caption_outputs(model, inputs, targets)
    return {"text": generation.sequences, "generation_embeddings": image_conditioning(
                model, generation.voken_states())[0], "retrieval_scores": scores,
            "p_retrieve": torch.tensor([d.p_retrieve for d in decide(model, img0)]),
            "heldout_text_embeds": forward.text_embeds, "heldout_gen_embeds": forward.gen_embeds}


def save_with_card(model, trainer, adapter_dir: str, results: dict):
    """``save_pretrained`` + a README.md model card carrying the held-out numbers."""
    from ..html_report import write_text_atomic

    model.save_pretrained(adapter_dir)
    card = build_model_card(model.config, repo_id="gill-hf-quickstart",
                            num_parameters=count_adapter_parameters(model.config)["total"],
                            datasets=["procedural shapes (gill_hf.toy_data), held-out scenes never trained on"],
                            hyperparameters=trainer.args,
                            eval_results=[{"metric": name, "held-out value": value, "baseline": baseline}
                                          for name, value, baseline in results_rows(results)],
                            tags=["toy", "tiny-random-backbones"])
    write_text_atomic(os.path.join(adapter_dir, "README.md"), card.content)


def reload_check(model, adapter_dir: str, answer_args: tuple) -> dict:
    """Reload the adapter with ``from_pretrained`` and compare every answer bitwise -> ``{check: bool}``."""
    reloaded = GILLForConditionalGeneration.from_pretrained(adapter_dir).eval()
    before, after = model_answers(model.eval(), *answer_args), model_answers(reloaded, *answer_args)
    return {name: bool(torch.equal(before[name], after[name])) for name in before}


@contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch CPU threads, restoring the previous count after."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_quickstart(out_dir: str | os.PathLike, settings: QuickstartSettings | None = None) -> dict:
    """Run every step into ``out_dir`` (backbones/, targets/, heldout_images/, retrieval_index/, gill-adapter/,
    loss_curves.png, report.html, report.json) and return the report's numbers."""
    settings = settings or QuickstartSettings()
    with torch_threads(settings.num_threads):
        return _run(os.path.abspath(os.fspath(out_dir)), settings)


def _run(out_dir: str, settings: QuickstartSettings) -> dict:
    timings, clock = {}, time.perf_counter()

    def lap(name):
        nonlocal clock
        timings[name] = round(time.perf_counter() - clock, 2)
        clock = time.perf_counter()

    paths = build_tiny_backbones(os.path.join(out_dir, "backbones"))
    data = make_toy_data(settings, out_dir)
    stores = make_target_stores({"train": data.train_captions, "heldout": data.heldout_captions}, paths["sd"],
                                out_dir)
    targets = stacked_targets(stores["heldout"])  # (N, L, D)
    model = build_model(paths, settings.seed)
    inputs = heldout_inputs(model, data)
    untrained = measures.caption_outputs(model, inputs, targets).gen_embeds
    lap("data")
    trainer, history = train_adapter(model, data, stores["train"], settings, out_dir)
    model.eval()
    lap("training")
    index = RetrievalIndex.from_images(model, data.heldout_images, data.heldout_paths)
    index.save(os.path.join(out_dir, "retrieval_index"))
    trained = measures.caption_outputs(model, inputs, targets)
    pipe = GILLPipeline.from_gill(model, retrieval_index=index)
    pipe.set_progress_bar_config(disable=True)
    mse, images = measures.image_agreement(pipe, trained.gen_embeds, targets, untrained, settings.seed,
                                           settings.diffusion_steps, settings.guidance_scale)
    results = {"num_heldout": len(data.heldout_captions),
               "retrieval": {"recall_at_1": measures.recall_at_1(index, trained.text_embeds),
                             "chance": 1 / len(index)},
               "embedding_cosine": measures.embedding_agreement(trained.gen_embeds, targets, untrained),
               "image_mse": mse}
    lap("measures")
    results["decision"] = fit_decision(model, decision_split(data, settings), settings)
    lap("decision")
    prompts = story_prompts(data, settings.seed)
    answers = answer_stories(pipe, prompts, settings)
    results["stories"] = story_scores(prompts, answers)
    lap("stories")
    adapter_dir = os.path.join(out_dir, "gill-adapter")
    save_with_card(model, trainer, adapter_dir, results)
    checks = reload_check(model, adapter_dir, (prompts, inputs, targets, index, settings))
    lap("save_reload")
    report = {"settings": asdict(settings), "results": results, "loss_history": history,
              "reload": {"identical": all(checks.values()), "checks": checks},
              "heldout_captions": data.heldout_captions, "heldout_paths": data.heldout_paths,
              "paths": {"out_dir": out_dir, "adapter": adapter_dir, "index": os.path.join(out_dir, "retrieval_index"),
                        "report_html": os.path.join(out_dir, "report.html"),
                        "report_json": os.path.join(out_dir, "report.json"),
                        "loss_plot": os.path.join(out_dir, "loss_curves.png")},
              "timings_s": timings}
    write_reports(report, prompts, answers, images, data.heldout_captions)
    print(summary_text(report))
    return report
