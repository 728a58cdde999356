r"""An offline sample-quality score for the DCGAN example: the Fréchet distance in PCA space.

``FrechetPCA`` fits the mean and the top ``k`` principal directions of real
training images (pixels in [-1, 1]), then compares two image sets by the Fréchet
distance between Gaussians fitted to their ``k`` projections:

$$\mathrm{FD} = \lVert \mu_r - \mu_g \rVert^2 + \operatorname{tr}\Sigma_r
  + \operatorname{tr}\Sigma_g - 2 \operatorname{tr}(\Sigma_r^{1/2} \Sigma_g \Sigma_r^{1/2})^{1/2}.$$

What it measures: whether the generated images match the real ones in their
mean image and in the variances and covariances of the ``k`` directions along
which real images vary most (with CURVES: where the strokes lie and how thick
they are). It needs no network trained elsewhere and no download. Its limits:
it sees only first and second moments of a linear projection, so it is blind to
fine detail, sharpness and higher-order structure (blurry samples with the right
covariance score well); it does not detect memorised training images; it
depends on ``k`` and on the number of samples (the finite-sample bias is of the
order of the real-vs-real score printed next to it, the floor a perfect
generator reaches); and its values are not comparable with published FID
numbers (Inception features).
"""

from __future__ import annotations

import torch
from torch import Tensor


class FrechetPCA:
    """Fréchet distance between image sets in the top-``k`` PCA space of real images.

    Args:
        reference: ``[N, C, H, W]`` real images the principal directions come from.
        k: Number of principal directions (at most ``min(N, C*H*W)``).

    Cost: one SVD of the ``[N, C*H*W]`` reference (float64) at construction;
    per score two ``k x k`` covariances and eigendecompositions.
    """

    def __init__(self, reference: Tensor, k: int = 32) -> None:
        flat = reference.flatten(1).double()
        k = min(k, flat.shape[0] - 1, flat.shape[1])
        if k < 1:
            raise ValueError("FrechetPCA needs at least two reference images.")
        self.mean = flat.mean(0)
        _, _, vh = torch.linalg.svd(flat - self.mean, full_matrices=False)
        self.basis = vh[:k].T  # [D, k]
        self.k = k

    def _moments(self, images: Tensor) -> tuple[Tensor, Tensor]:
        z = (images.flatten(1).double().to(self.mean.device) - self.mean) @ self.basis
        return z.mean(0), torch.cov(z.T).reshape(self.k, self.k)

    def score(self, real: Tensor, fake: Tensor) -> float:
        """The Fréchet distance between ``real`` and ``fake`` (``[M, C, H, W]`` each)."""
        mu_r, cov_r = self._moments(real)
        mu_f, cov_f = self._moments(fake)
        evals, evecs = torch.linalg.eigh(cov_r)
        root = evecs @ torch.diag(evals.clamp_min(0).sqrt()) @ evecs.T
        cross = torch.linalg.eigvalsh(root @ cov_f @ root).clamp_min(0).sqrt().sum()
        fd = (mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * cross
        return float(fd.clamp_min(0))
