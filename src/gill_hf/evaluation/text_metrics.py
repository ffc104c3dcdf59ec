"""MiniGPT-5's text metrics, one score per (prediction, reference) pair, from established packages.

* BLEU-n: torchmetrics ``BLEUScore(n_gram=n)`` per sentence (cumulative: geometric mean of the 1..n-gram precisions
  times the brevity penalty, whitespace tokens, no smoothing: a sentence without a matching n-gram scores 0).
* ROUGE-L: torchmetrics ``rouge_score`` F-measure (its normalisation: lower case, alphanumeric tokens).
* METEOR: ``nltk.translate.meteor_score`` on lower-cased ``wordpunct_tokenize`` tokens. It matches synonyms through
  WordNet, which nltk keeps as separate data: ``python -m nltk.downloader wordnet`` once (or pass ``wordnet=``, any
  object with nltk's ``synsets(word)``).
* SBERT: cosine of sentence-transformers embeddings (default ``all-MiniLM-L6-v2``, as MiniGPT-5).
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

DEFAULT_SBERT = "sentence-transformers/all-MiniLM-L6-v2"


def _check_pairs(predictions: Sequence[str], references: Sequence[str]):
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")


def bleu(predictions: Sequence[str], references: Sequence[str], n_gram: int) -> list[float]:
    """Sentence BLEU-``n_gram`` of each prediction against its reference."""
    from torchmetrics.functional.text import bleu_score

    _check_pairs(predictions, references)
    return [float(bleu_score([p], [[r]], n_gram=n_gram)) for p, r in zip(predictions, references)]


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> list[float]:
    """ROUGE-L F-measure of each prediction against its reference."""
    from torchmetrics.functional.text import rouge_score

    _check_pairs(predictions, references)
    return [float(rouge_score(p, r, rouge_keys="rougeL")["rougeL_fmeasure"]) for p, r in zip(predictions, references)]


def load_wordnet():
    """nltk's WordNet reader, or a ``LookupError`` saying how to install the data (before any model loads)."""
    try:
        import nltk
    except ImportError as err:
        raise ImportError("METEOR needs nltk: pip install 'gill_hf[eval-text]'") from err
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        try:
            nltk.data.find("corpora/wordnet.zip")
        except LookupError:
            raise LookupError("METEOR needs nltk's WordNet data: run `python -m nltk.downloader wordnet` once "
                              "(or set NLTK_DATA to a folder holding corpora/wordnet)") from None
    from nltk.corpus import wordnet

    return wordnet


def meteor(predictions: Sequence[str], references: Sequence[str], wordnet=None) -> list[float]:
    """nltk METEOR of each prediction against its reference (``wordnet``: default :func:`load_wordnet`)."""
    from nltk.tokenize import wordpunct_tokenize
    from nltk.translate.meteor_score import meteor_score

    _check_pairs(predictions, references)
    wordnet = wordnet if wordnet is not None else load_wordnet()
    return [meteor_score([wordpunct_tokenize(r.lower())], wordpunct_tokenize(p.lower()), wordnet=wordnet)
            for p, r in zip(predictions, references)]


class SentenceSimilarity:
    """``scores(predictions, references)`` -> cosine of each pair's sentence-transformers embeddings."""

    def __init__(self, name: str = DEFAULT_SBERT, device: str | torch.device = "cpu", batch_size: int = 64):
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError as err:
            raise ImportError("SBERT needs sentence-transformers: pip install 'gill_hf[eval-text]'") from err
        self.name, self.batch_size = name, batch_size
        self.model = SentenceTransformer(name, device=str(device))

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, d)`` float32 embeddings on CPU."""
        return self.model.encode(list(texts), batch_size=self.batch_size, convert_to_tensor=True,
                                 show_progress_bar=False).float().cpu()

    def scores(self, predictions: Sequence[str], references: Sequence[str]) -> list[float]:
        _check_pairs(predictions, references)
        if not predictions:
            return []
        cosines = torch.nn.functional.cosine_similarity(self.embed(predictions), self.embed(references), dim=-1)
        return [float(c) for c in cosines]


TEXT_METRICS = ("sbert", "rouge_l", "meteor", "bleu_1", "bleu_2")


@dataclass
class TextScorers:
    """The text scorers of one run: ``sbert`` (or None when not asked for) and the ``wordnet`` METEOR uses."""

    sbert: SentenceSimilarity | None = None
    wordnet: object = None

    def score(self, predictions: Sequence[str], references: Sequence[str], names: Sequence[str]
              ) -> dict[str, list[float]]:
        """``{name: [score per pair]}`` for each of ``names`` (from :data:`TEXT_METRICS`)."""
        unknown = [name for name in names if name not in TEXT_METRICS]
        if unknown:
            raise ValueError(f"unknown text metric(s) {unknown}; choose from {list(TEXT_METRICS)}")
        if "sbert" in names and self.sbert is None:
            raise ValueError("the sbert metric needs TextScorers(sbert=SentenceSimilarity(...))")
        compute = {"sbert": lambda: self.sbert.scores(predictions, references),
                   "rouge_l": lambda: rouge_l(predictions, references),
                   "meteor": lambda: meteor(predictions, references, self.wordnet),
                   "bleu_1": lambda: bleu(predictions, references, 1),
                   "bleu_2": lambda: bleu(predictions, references, 2)}
        return {name: compute[name]() for name in names}
