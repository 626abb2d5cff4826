"""The Fashion-MNIST loader: both local layouts, the download path (torchvision's, on local files), and
clear errors for missing or damaged files."""

from __future__ import annotations

import gzip

import pytest
import torch

from lars_plugins.demo import datasets
from lars_plugins.demo.datasets import find_fashion_mnist, load_fashion_mnist

pytestmark = pytest.mark.slow  # training studies: `python -m pytest -m "not slow"` leaves them out


def idx_bytes(tensor: torch.Tensor) -> bytes:
    """LeCun's idx format, written here from its definition."""
    header = bytes([0, 0, 0x08, tensor.ndim]) + b"".join(s.to_bytes(4, "big") for s in tensor.shape)
    return header + tensor.to(torch.uint8).numpy().tobytes()


def write_split(folder, gz, n_train=12, n_test=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    arrays = {"train-images-idx3-ubyte": torch.randint(0, 256, (n_train, 28, 28), generator=gen),
              "train-labels-idx1-ubyte": torch.randint(0, 10, (n_train,), generator=gen),
              "t10k-images-idx3-ubyte": torch.randint(0, 256, (n_test, 28, 28), generator=gen),
              "t10k-labels-idx1-ubyte": torch.randint(0, 10, (n_test,), generator=gen)}
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensor in arrays.items():
        data = idx_bytes(tensor)
        if gz:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.fixture
def no_debian_copy(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "no-such-folder")


@pytest.mark.parametrize("layout", ["debian", "torchvision"])
def test_reads_both_layouts_exactly(tmp_path, no_debian_copy, layout):
    folder = tmp_path / "data" if layout == "debian" else tmp_path / "data" / "FashionMNIST" / "raw"
    arrays = write_split(folder, gz=layout == "debian")
    split = load_fashion_mnist(tmp_path / "data")
    assert split.source == folder
    assert torch.equal(split.y_train, arrays["train-labels-idx1-ubyte"])
    assert torch.equal(split.y_test, arrays["t10k-labels-idx1-ubyte"])
    assert split.x_train.shape == (12, 1, 28, 28) and split.x_test.shape == (5, 1, 28, 28)
    # Standardised with the training set's statistics: the raw bytes come back.
    raw = arrays["train-images-idx3-ubyte"].float() / 255
    back = split.x_train.squeeze(1) * raw.std() + raw.mean()
    torch.testing.assert_close(back, raw, rtol=1e-5, atol=1e-5)


def test_missing_data_names_the_places_and_the_fixes(tmp_path, no_debian_copy):
    assert find_fashion_mnist(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="looked in .*FashionMNIST/raw.*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist(tmp_path)


def test_damaged_files_are_refused_with_their_path(tmp_path, no_debian_copy):
    write_split(tmp_path, gz=False)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte: 9 bytes of data where the header says 12"):
        load_fashion_mnist(tmp_path)
    labels.write_bytes(b"PK\x03\x04" + bytes(20))  # not an idx file at all
    with pytest.raises(ValueError, match="not an idx file"):
        load_fashion_mnist(tmp_path)


def test_download_goes_through_torchvision_into_root(tmp_path, no_debian_copy, monkeypatch):
    """The real download path, with torchvision's FashionMNIST replaced by one that 'downloads' local
    files into the layout torchvision writes (there is no network here)."""
    torchvision_datasets = pytest.importorskip("torchvision.datasets")
    calls = []

    class OfflineFashionMNIST:
        def __init__(self, root, train=True, download=False):
            calls.append((root, train, download))
            write_split(tmp_path / "dl" / "FashionMNIST" / "raw", gz=False)

    monkeypatch.setattr(torchvision_datasets, "FashionMNIST", OfflineFashionMNIST)
    with pytest.raises(FileNotFoundError):
        load_fashion_mnist(tmp_path / "dl")  # never downloads unless asked
    split = load_fashion_mnist(tmp_path / "dl", download=True)
    assert calls == [(str(tmp_path / "dl"), True, True), (str(tmp_path / "dl"), False, True)]
    assert split.source == tmp_path / "dl" / "FashionMNIST" / "raw" and len(split.y_train) == 12


def test_the_real_copy_when_installed():
    if find_fashion_mnist() is None:
        pytest.skip("Fashion-MNIST is not installed here (apt-get install dataset-fashion-mnist)")
    split = load_fashion_mnist()
    assert split.x_train.shape == (60000, 1, 28, 28) and split.x_test.shape == (10000, 1, 28, 28)
    assert split.y_train.bincount().tolist() == [6000] * 10 and split.y_test.bincount().tolist() == [1000] * 10
    assert abs(float(split.x_train.mean())) < 1e-4
