"""Contextual image retrieval on VIST (paper Table 5): Recall@1/5/10 of the last image of each story among the
last images of all evaluated stories, queried by the [IMG0] retrieval embedding produced after the context.

The [IMG0..r-1] block is forced right after the context (greedy, so no seeds); the query is ``W_t2i h_[IMG0]``,
the candidates a :class:`RetrievalIndex` of ``W_i2t CLIP(x)``. Written to ``out_dir``: the results, the index
(``index/``) and the queries of every setting (``queries.safetensors``).
"""

import os
from collections.abc import Sequence

import safetensors.torch
import torch
from tqdm.auto import tqdm

from ..atomic import atomic_path
from ..retrieval import RetrievalIndex
from .contexts import VIST_SETTINGS, ImageExample, vist_context
from .image_cache import safe_name
from .metrics import recall_at_k
from .report import sample_section, write_report

KS = (1, 5, 10)


@torch.no_grad()
def query_embeddings(model, contexts: Sequence[list], batch_size: int = 8) -> torch.Tensor:
    """``(Q, p)`` retrieval embeddings of [IMG0] forced after each interleaved context."""
    chunks = []
    for start in tqdm(range(0, len(contexts), batch_size), desc="queries", unit="batch"):
        encoded = model.processor(list(contexts[start:start + batch_size]), padding_side="left")
        generation = model.generate(**encoded.to(model.device), force_image_after=0, return_dict_in_generate=True,
                                    max_new_tokens=model.config.num_img_tokens)
        chunks.append(model.text_retrieval_embeddings(generation.img0_hidden_states()).float().cpu())
    return torch.cat(chunks)


def evaluate_retrieval(model, examples: Sequence[ImageExample], out_dir: str,
                       settings: Sequence[str] = VIST_SETTINGS, batch_size: int = 8, num_samples: int = 8) -> dict:
    """Recall@k (percent) per setting; returns the ``results.json`` content."""
    unknown = [s for s in settings if s not in VIST_SETTINGS]
    if unknown:
        raise ValueError(f"unknown VIST setting(s) {unknown}; choose from {list(VIST_SETTINGS)}")
    targets = [ex.target for ex in examples]
    index = RetrievalIndex.from_images(model, targets, dtype=torch.float32)
    index.save(os.path.join(out_dir, "index"))
    truth = torch.arange(len(examples))
    rows, queries, ranked_by_setting = [], {}, {}
    for setting in settings:
        contexts = [vist_context(ex, setting) for ex in examples]
        queries[safe_name(setting)] = query_embeddings(model, contexts, batch_size)
        _, ranked = index.search(queries[safe_name(setting)], k=max(KS))  # (Q, min(10, N))
        ranked_by_setting[setting] = ranked
        rows.append({"model": "GILL", "setting": setting, **recall_at_k(ranked, truth, KS)})
    with atomic_path(os.path.join(out_dir, "queries.safetensors")) as tmp:
        safetensors.torch.save_file(queries, tmp)
    results = {"benchmark": "retrieval", "num_examples": len(examples), "num_candidates": len(index),
               "settings": list(settings), "rows": rows}
    header = "| Model | Context | " + " | ".join(f"R@{k} ↑" for k in KS) + " |"
    lines = [header, "|---|---|" + "---|" * len(KS)]
    lines += [f"| {r['model']} | {r['setting']} | " + " | ".join(f"{r[f'R@{k}']:.1f}" for k in KS) + " |"
              for r in rows]
    sections = []
    richest = settings[-1]
    for i, example in enumerate(examples[:num_samples]):
        top = [(f"rank {rank + 1}" + (" (correct)" if j == i else ""), targets[j])
               for rank, j in enumerate(ranked_by_setting[richest][i, :3].tolist())]
        sections.append(sample_section(f"{example.example_id} ({richest})", vist_context(example, richest),
                                       example.target, top))
    write_report(out_dir, results, "\n".join(lines) + "\n", sections, "VIST contextual image retrieval")
    return results
