"""The curvature as an operator: eigenvalues, trace, log-determinant, products, inverse, draws.

A small MLP is trained on scikit-learn's bundled digits; then KFAC is fitted to
the whole training set in one pass (``decay=1.0``: the sample-weighted mean of
the Kronecker factors) and used on its own, without the optimizer. Every number
the operator returns is checked against the dense block of the small last layer.
"""

import torch
from sklearn.datasets import load_digits
from torch import nn

from curvlib import KFAC, CurvatureExtractor, FisherType, KFACDamping

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
model = nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))
loss_fn = nn.CrossEntropyLoss()

# A short training run, so that the curvature is that of a useful model.
adam = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(200):
    batch = torch.randint(0, len(x), (128,))
    adam.zero_grad()
    loss_fn(model(x[batch]), y[batch]).backward()
    adam.step()

# Fit KFAC with the exact Fisher (type-2) over the data set, one pass of 256-image batches.
# KFACDamping.EIGEN damps exactly: the damped operator is D = C + damping * I.
approx = KFAC(KFACDamping.EIGEN, decay=1.0)
extractor = CurvatureExtractor(
    model, loss_fn, stats=approx.required_stats, fisher_type=FisherType.EXACT
)
for start in range(0, len(x), 256):
    with extractor.collect():
        loss_fn(model(x[start : start + 256]), y[start : start + 256]).backward()
    approx.update(extractor.statistics())
model.zero_grad()
print(f"fitted on {approx.num_samples_seen} images in {approx.num_updates} batches")

# The last layer, [W | b] of shape 10 x 33: its dense blocks are 330 x 330.
layer = extractor.layout.names[-1]
damping = 1e-3
dense = approx.to_dense(layer)  # C, the Kronecker product G ⊗ A
damped = approx.damped_to_dense(layer, damping)  # D = C + damping * I
eigenvalues = torch.linalg.eigvalsh(damped.double())  # ascending
print(f"layer {layer!r}: {dense.shape[0]} parameters")
print("largest eigenvalues of D:", " ".join(f"{v:.4g}" for v in eigenvalues.flip(0)[:4]))
print(f"smallest eigenvalue of D: {eigenvalues[0]:.4g} (>= damping {damping:g})")
print(f"condition number of D:    {eigenvalues[-1] / eigenvalues[0]:.4g}")

# trace and logdet use the Kronecker structure: O(d_out + d_in) and two eigendecompositions.
print(f"trace C:      {approx.trace(layer):.6g}  (dense: {dense.trace():.6g})")
logdet_dense = torch.linalg.slogdet(damped.double()).logabsdet
print(f"log det D:    {approx.logdet(damping, layer):.6g}  (dense: {logdet_dense:.6g})")
print(
    f"trace C, all layers: {approx.trace():.6g}; log det D, all layers: "
    f"{approx.logdet(damping):.6g}"
)

# Products with C and with the inverse of D act on per-layer [W | b] matrices.
generator = torch.Generator().manual_seed(0)
v = torch.randn(dense.shape[0], generator=generator)
shape = approx.blocks[layer].out_dim, approx.blocks[layer].in_dim
cv = approx.matvec({layer: v.reshape(shape)})[layer]  # row-major vectorisation
print(f"matvec:  |C v - dense C v| / |C v|   = {(cv.flatten() - dense @ v).norm() / cv.norm():.1e}")
inverse = approx.inverse(damping)  # a new operator: later updates never change it
u = inverse.apply({layer: v.reshape(shape)})[layer]
print(f"inverse: |D u - v| / |v|             = {(damped @ u.flatten() - v).norm() / v.norm():.1e}")
print(f"inverse: condition number estimate   = {inverse.condition_numbers[layer]:.4g}")

# Draws from N(0, D^-1): their covariance approaches D^-1 as the number of draws grows.
draws = approx.sample(damping, 20000, generator=generator)[layer].flatten(1).double()
covariance = draws.T @ draws / len(draws)
exact = torch.linalg.inv(damped.double())
error = (covariance.diagonal() / exact.diagonal() - 1).abs().median()
print(f"sample:  20000 draws; median relative error of their variances = {error:.3f}")
print("         (the sampling error of a variance from 20000 draws: sqrt(2/20000) = 0.010)")
