"""The papers' data files for the autoencoders: tiny files in the real formats, real loaders.

CURVES as ``digs3pts_1.mat`` (MATLAB v5, ``bdata`` and ``bdatatest``), FACES as
``newfaces_rot_single.mat`` (``newfaces_single``, one face per column, split
25/40 : 10/40), and MNIST with the papers' 50,000/10,000 split of its training set.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import autoencoder  # noqa: E402
import data  # noqa: E402

from tests.examples.test_autoencoder import write_tiny_mnist  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
RUN = ["--optim", "adam", "--num-epochs", "1", "--batch-size", "10", "--no-progress"]


def write_curves_mat(path: Path, n_train: int = 30, n_test: int = 12) -> np.ndarray:
    """``digs3pts_1.mat``: ``bdata [n_train, 784]``, ``bdatatest [n_test, 784]``, doubles."""
    from scipy.io import savemat

    rng = np.random.default_rng(4)
    images = rng.random((n_train + n_test, 784))
    savemat(path, {"bdata": images[:n_train], "bdatatest": images[n_train:]}, format="5")
    return images


def test_curves_reads_the_published_mat_file(tmp_path: Path) -> None:
    path = tmp_path / "digs3pts_1.mat"
    images = write_curves_mat(path)
    split = data.load_data("curves", curves_path=path)
    assert split.name == "curves"
    assert split.train.shape == (30, 784) and split.test.shape == (12, 784)
    assert split.train.dtype == torch.float32
    assert torch.equal(split.train, torch.from_numpy(images[:30]).float())
    assert torch.equal(split.test, torch.from_numpy(images[30:]).float())
    few = data.load_data("curves", curves_path=path, num_train=20, num_test=5)
    assert torch.equal(few.train, split.train[:20]) and torch.equal(few.test, split.test[:5])
    results = autoencoder.main(["--curves-path", str(path), *RUN, "--out", str(tmp_path / "r")])
    history = results[0].metrics
    assert len(history) == 2 and all(np.isfinite(m["train_loss"]) for m in history)


def test_curves_file_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from scipy.io import savemat

    missing = tmp_path / "digs3pts_1.mat"
    with pytest.raises(SystemExit) as exc:
        autoencoder.main(["--curves-path", str(missing), "--out", str(tmp_path / "r")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(missing) in err and "never download" in err
    savemat(tmp_path / "other.mat", {"bdata": np.zeros((4, 784))})
    with pytest.raises(ValueError, match="'bdatatest' of shape"):
        data.load_curves_file(tmp_path / "other.mat", None, None)
    with pytest.raises(SystemExit):
        autoencoder.main(["--data", "mnist", "--curves-path", str(missing)])
    assert "--curves-path applies to --data curves only" in capsys.readouterr().err


def test_mnist_papers_split_holds_out_the_end_of_the_training_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(data, "MNIST_VALIDATION", 10)  # 60,000 -> 50,000 + 10,000, scaled down
    train = torch.from_numpy(write_tiny_mnist(tmp_path, num_train=30)).reshape(30, 784) / 255
    split = data.load_data("mnist", data_root=tmp_path, mnist_split="50k-10k")
    assert torch.equal(split.train, train[:20].float())
    assert torch.equal(split.test, train[20:].float())
    few = data.load_mnist(tmp_path, num_train=5, num_test=3, split="50k-10k")
    assert torch.equal(few.train, train[:5].float()) and torch.equal(few.test, train[20:23])
    official = data.load_mnist(tmp_path, None, None)
    assert official.train.shape == (30, 784) and official.test.shape == (10, 784)
    results = autoencoder.main(
        ["--data", "mnist", "--data-root", str(tmp_path), "--mnist-split", "50k-10k", *RUN,
         "--out", str(tmp_path / "r")]
    )  # fmt: skip
    assert len(results[0].metrics) == 2
    monkeypatch.setattr(data, "MNIST_VALIDATION", 30)
    with pytest.raises(ValueError, match="only 30"):
        data.load_mnist(tmp_path, None, None, split="50k-10k")
    with pytest.raises(ValueError, match="Unknown MNIST split"):
        data.load_mnist(tmp_path, None, None, split="55k-5k")
    with pytest.raises(SystemExit):
        autoencoder.main(["--mnist-split", "50k-10k", "--out", str(tmp_path / "c")])
    assert "--mnist-split applies to --data mnist only" in capsys.readouterr().err


def test_faces_published_file_is_split_as_in_the_papers(tmp_path: Path) -> None:
    from scipy.io import savemat

    faces = data.synthetic_faces(85, seed=2).numpy()  # 2 x 40 images, and 5 more
    path = tmp_path / "newfaces_rot_single.mat"
    savemat(path, {"newfaces_single": faces.T}, format="5")  # [625, N], one face per column
    split = data.load_data("faces", faces_path=path)
    # M = 85 // 40 = 2: the first 25 M train, the last 10 M test.
    assert split.train.shape == (50, 625) and split.test.shape == (20, 625)
    assert torch.equal(split.train, torch.from_numpy(faces[:50]))
    assert torch.equal(split.test, torch.from_numpy(faces[65:]))
    few = data.load_data("faces", faces_path=path, num_train=10, num_test=4)
    assert torch.equal(few.train, split.train[:10]) and torch.equal(few.test, split.test[:4])
    savemat(path, {"newfaces_single": faces[:30].T})
    with pytest.raises(ValueError, match="fewer than 40"):
        data.load_faces(path, None, None)
