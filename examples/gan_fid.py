r"""The Fréchet Inception Distance of the GAN example, from Inception weights in a local file.

``FrechetInception`` wraps torchmetrics' ``FrechetInceptionDistance`` (2048
pool features of the InceptionV3 that torch-fidelity ports from the original
TensorFlow FID code; images resized to 299x299 inside), the FID of Heusel et al.
(2017):

$$\mathrm{FID} = \lVert \mu_r - \mu_g \rVert^2 + \operatorname{tr}\Sigma_r
  + \operatorname{tr}\Sigma_g - 2 \operatorname{tr}(\Sigma_r \Sigma_g)^{1/2}$$

of Gaussians fitted to the features of real and generated images. The weights
are never downloaded: ``--fid-weights PATH`` names torch-fidelity's
``weights-inception-2015-12-05-6726825d.pth`` (the file it would otherwise fetch
on first use), loaded as a state dict of tensors. torchmetrics and
torch-fidelity are the optional extra ``curvlib[fid]``, imported only when a
path is given. Grey images are repeated to three channels. The score is
comparable with published FID numbers only at their sample size (50,000
generated images, usually); at the example's 1,000 its finite-sample bias is
large, so compare runs with each other and with ``fid_real``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

EXTRA = "curvlib[fid]"
"""The optional extra that installs torchmetrics and torch-fidelity."""

FIRST_KEY = "Conv2d_1a_3x3.conv.weight"
"""A key every state dict of torch-fidelity's InceptionV3 has."""


class FidUnavailable(RuntimeError):
    """``--fid-weights`` cannot be honoured: the extra is missing or the file is wrong."""


class FrechetInception:
    """FID between image sets, the real set's features computed once.

    Args:
        weights: torch-fidelity's InceptionV3 weights (a state dict file).
        real: ``[N, C, H, W]`` real images in [-1, 1] (C is 1 or 3), the fixed side.
        device: Where the Inception network runs.
        batch: Images per Inception forward pass.

    Raises:
        FidUnavailable: If torchmetrics or torch-fidelity is missing, the file does
            not exist or does not hold InceptionV3 weights.

    Cost: about 6 GFLOP per image (InceptionV3 at 299x299) and one 2048x2048
    matrix square root per score: meant for a GPU.
    """

    def __init__(self, weights: Path, real: Tensor, device: torch.device, batch: int = 100) -> None:
        metric_class = _metric_class()
        _check_weights(weights)
        self.batch = batch
        self.device = device
        self.metric: Any = metric_class(
            feature=2048,
            normalize=True,
            reset_real_features=False,
            feature_extractor_weights_path=str(weights),
        ).to(device)
        self._update(real, real=True)

    def _update(self, images: Tensor, real: bool) -> None:
        for i in range(0, len(images), self.batch):
            chunk = images[i : i + self.batch].to(self.device).float()
            if chunk.shape[1] == 1:
                chunk = chunk.expand(-1, 3, -1, -1)
            self.metric.update(((chunk + 1) / 2).clamp(0, 1), real=real)

    @torch.no_grad()
    def score(self, fake: Tensor) -> float:
        """The FID between the real images and ``fake`` (``[M, C, H, W]`` in [-1, 1])."""
        self._update(fake, real=False)
        value = float(self.metric.compute())
        self.metric.reset()  # keeps the real features (reset_real_features=False)
        return value


def _metric_class() -> Any:
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE
    except ImportError:
        raise FidUnavailable(_missing("torchmetrics")) from None
    if not _TORCH_FIDELITY_AVAILABLE:
        raise FidUnavailable(_missing("torch-fidelity"))
    return FrechetInceptionDistance


def _missing(package: str) -> str:
    return (
        f"--fid-weights needs {package}, of the optional extra {EXTRA} (torchmetrics and "
        f"torch-fidelity): pip install '{EXTRA}' (from a checkout: "
        "pip install -c constraints.txt -e '.[fid]'); "
        "without it the PCA Fréchet distance fd is the score."
    )


def _check_weights(path: Path) -> None:
    """Refuse a missing file or one without InceptionV3 weights, before torch-fidelity reads it."""
    if not path.is_file():
        raise FidUnavailable(
            f"--fid-weights {path}: no such file. Give torch-fidelity's InceptionV3 weights, "
            "weights-inception-2015-12-05-6726825d.pth (nothing is downloaded)."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable file gets the same answer
        raise FidUnavailable(
            f"--fid-weights {path}: not a file of tensors torch can load ({err})."
        ) from None
    if not isinstance(state, dict) or FIRST_KEY not in state:
        raise FidUnavailable(
            f"--fid-weights {path}: not the InceptionV3 state dict of torch-fidelity (no "
            f"{FIRST_KEY!r}); give weights-inception-2015-12-05-6726825d.pth."
        )
