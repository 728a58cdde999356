"""The image loaders of ``examples/data.py``: tiny files in the real formats, real loaders.

Fashion-MNIST as gzipped IDX files, CIFAR-10 and CIFAR-100 as the python pickles, SVHN as the
MATLAB files, each read by torchvision's own reader; the generated sets are
deterministic; missing files give a one-line error naming every file.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import cnn  # noqa: E402
import conv_autoencoder  # noqa: E402
import data  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    with gzip.open(path.with_name(path.name + ".gz"), "wb") as fh:
        fh.write(header + array.astype(np.uint8).tobytes())


def write_fashion(root: Path, n_train: int = 12, n_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (n_train + n_test, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n_train + n_test, dtype=np.uint8)
    write_idx_gz(raw / "train-images-idx3-ubyte", images[:n_train])
    write_idx_gz(raw / "train-labels-idx1-ubyte", labels[:n_train])
    write_idx_gz(raw / "t10k-images-idx3-ubyte", images[n_train:])
    write_idx_gz(raw / "t10k-labels-idx1-ubyte", labels[n_train:])
    return images, labels


def write_cifar10(root: Path, per_batch: int = 4) -> tuple[np.ndarray, list[int]]:
    """The six pickles of the python CIFAR-10 distribution (rows: 3072 bytes, CHW order)."""
    folder = root / data.CIFAR10_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(2)
    rows = rng.integers(0, 256, (6 * per_batch, 3072), dtype=np.uint8)
    labels = [int(v) for v in rng.integers(0, 10, 6 * per_batch)]
    for i, name in enumerate(data.CIFAR10_FILES):
        part = slice(i * per_batch, (i + 1) * per_batch)
        entry = {"batch_label": name, "data": rows[part], "labels": labels[part]}
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {"label_names": [f"class{i}" for i in range(10)]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta))
    return rows, labels


def write_cifar100(root: Path, n_train: int = 8, n_test: int = 4) -> tuple[np.ndarray, list[int]]:
    """``train`` and ``test`` of the python CIFAR-100 distribution, with ``fine_labels``."""
    folder = root / data.CIFAR100_DIR
    folder.mkdir(parents=True)
    rng = np.random.default_rng(5)
    rows = rng.integers(0, 256, (n_train + n_test, 3072), dtype=np.uint8)
    fine = [int(v) for v in rng.integers(0, 100, n_train + n_test)]
    for name, part in (("train", slice(0, n_train)), ("test", slice(n_train, None))):
        entry = {
            "filenames": [f"{name}{i}.png" for i in range(len(rows[part]))],
            "batch_label": f"{name} batch",
            "fine_labels": fine[part],
            "coarse_labels": [v // 5 for v in fine[part]],
            "data": rows[part],
        }
        (folder / name).write_bytes(pickle.dumps(entry))
    meta = {
        "fine_label_names": [f"fine{i}" for i in range(100)],
        "coarse_label_names": [f"coarse{i}" for i in range(20)],
    }
    (folder / "meta").write_bytes(pickle.dumps(meta))
    return rows, fine


def write_svhn(root: Path, n_train: int = 10, n_test: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """``train_32x32.mat``/``test_32x32.mat``: ``X [32, 32, 3, N]``, ``y [N, 1]`` in 1..10."""
    from scipy.io import savemat

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (32, 32, 3, n_train + n_test), dtype=np.uint8)
    y = rng.integers(1, 11, (n_train + n_test, 1)).astype(np.uint8)
    y[0, 0] = 10  # the files' label of the digit 0
    savemat(root / "train_32x32.mat", {"X": x[..., :n_train], "y": y[:n_train]})
    savemat(root / "test_32x32.mat", {"X": x[..., n_train:], "y": y[n_train:]})
    return x, y


def test_fashion_mnist_reads_gzipped_idx_files(tmp_path: Path) -> None:
    images, labels = write_fashion(tmp_path)
    split = data.load_images("fashion-mnist", data_root=tmp_path, num_train=10)
    assert split.train_x.shape == (10, 1, 28, 28) and split.test_x.shape == (6, 1, 28, 28)
    assert torch.equal(split.train_x[:, 0], torch.from_numpy(images[:10]).float() / 255)
    assert split.test_y.tolist() == labels[12:].tolist()
    assert split.num_classes == 10 and split.image_shape == (1, 28, 28)


@pytest.mark.parametrize(
    ("name", "write", "folder", "meta", "num_train", "classes"),
    [
        ("cifar10", write_cifar10, data.CIFAR10_DIR, "batches.meta", 20, 10),
        ("cifar100", write_cifar100, data.CIFAR100_DIR, "meta", 8, 100),
    ],
)
def test_cifar_reads_the_python_pickles(
    name: str,
    write: Callable[[Path], tuple[np.ndarray, list[int]]],
    folder: str,
    meta: str,
    num_train: int,
    classes: int,
    tmp_path: Path,
) -> None:
    """CIFAR-10's ``labels`` and CIFAR-100's ``fine_labels``, images in CHW order."""
    rows, labels = write(tmp_path)
    split = data.load_images(name, data_root=tmp_path)
    num_test = len(rows) - num_train
    assert split.train_x.shape == (num_train, 3, 32, 32)
    assert split.test_x.shape == (num_test, 3, 32, 32)
    expected = torch.from_numpy(rows[:num_train].reshape(num_train, 3, 32, 32)).float() / 255
    assert torch.equal(split.train_x, expected)
    assert split.train_y.tolist() == labels[:num_train]
    assert split.test_y.tolist() == labels[num_train:]
    assert split.num_classes == classes
    (tmp_path / folder / meta).unlink()  # optional
    assert torch.equal(data.load_images(name, data_root=tmp_path).test_x, split.test_x)


def test_svhn_reads_the_mat_files_and_maps_label_10_to_0(tmp_path: Path) -> None:
    x, y = write_svhn(tmp_path)
    split = data.load_images("svhn", data_root=tmp_path)
    assert split.train_x.shape == (10, 3, 32, 32) and split.test_x.shape == (5, 3, 32, 32)
    expected = torch.from_numpy(x[..., :10]).permute(3, 2, 0, 1).float() / 255
    assert torch.equal(split.train_x, expected)
    assert split.train_y[0] == 0
    assert split.train_y[1:].tolist() == [v % 10 for v in y[1:10, 0].tolist()]


def test_generated_sets_are_deterministic_and_balanced() -> None:
    a = data.load_images("synthetic", num_train=200, num_test=50, seed=4)
    b = data.load_images("synthetic", num_train=200, num_test=50, seed=4)
    c = data.load_images("synthetic", num_train=200, num_test=50, seed=5)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)
    assert a.train_x.shape == (200, 3, 32, 32) and a.num_classes == 10
    assert float(a.train_x.min()) >= 0.0 and float(a.train_x.max()) <= 1.0
    counts = torch.bincount(torch.cat([a.train_y, a.test_y]), minlength=10)
    assert counts.tolist() == [25] * 10
    curves = data.load_images("curves", num_train=20, num_test=5, seed=0)
    assert curves.train_x.shape == (20, 1, 28, 28) and curves.num_classes == 0
    flat = data.load_curves(20, 5, seed=0).train
    assert torch.equal(curves.train_x.flatten(1), flat)


@pytest.mark.parametrize(
    ("name", "files"),
    [
        ("fashion-mnist", [f"FashionMNIST/raw/{f}" for f in data.MNIST_FILES]),
        ("cifar10", [f"{data.CIFAR10_DIR}/{f}" for f in data.CIFAR10_FILES]),
        ("cifar100", [f"{data.CIFAR100_DIR}/{f}" for f in data.CIFAR100_FILES]),
        ("svhn", list(data.SVHN_FILES)),
    ],
)
def test_missing_files_say_which_files_to_put_where(
    name: str, files: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        cnn.main(["--data", name, "--data-root", str(tmp_path), "--out", str(tmp_path / "o")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "never download" in err
    for f in files:
        assert str(tmp_path / f) in err
    assert "--data synthetic" in err
    with pytest.raises(SystemExit):
        conv_autoencoder.main(["--data", name, "--data-root", str(tmp_path)])
    assert "--data curves" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("name", "write", "fall"),
    [
        ("cifar10", write_cifar10, 0.05),
        # 100 classes from 20 images: the loss starts at ln 100 and falls less in one epoch.
        ("cifar100", lambda root: write_cifar100(root, n_train=20), 0.015),
    ],
)
def test_cnn_trains_on_cifar_files(
    name: str, write: Callable[[Path], object], fall: float, tmp_path: Path
) -> None:
    write(tmp_path / "data")
    # Two steps of statistics from 3 images each: a fixed damping, as the default's
    # warm-up would hold it at 130 times its final value.
    results = cnn.main(
        ["--data", name, "--data-root", str(tmp_path / "data"), "--optim", "kfac",
         "--batch-size", "10", "--num-epochs", "1", "--no-progress", "--out", str(tmp_path / "o"),
         "--damping", "1e-3", "--damping-warmup-samples", "0"]
    )  # fmt: skip
    final = results[0].final
    assert final["test_accuracy"] is not None and 0.0 <= final["test_accuracy"] <= 1.0
    # One epoch on 20 images: the training loss falls by at least `fall`.
    assert final["train_loss"] < (1.0 - fall) * results[0].metrics[0]["train_loss"]
