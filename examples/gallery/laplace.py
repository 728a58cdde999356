"""A Laplace approximation with KFAC: a posterior around the trained weights, and its predictive.

Recipe of the docs page "The curvature as an operator". The training images'
Gauss-Newton matrix is ``N C`` once KFAC is fitted with ``decay=1.0`` (the
sample-weighted mean over one pass), and with a Gaussian prior of precision
``tau`` the posterior is ``N(theta_map, (N C + tau I)^-1)``, the inverse of the
approximation damped by ``tau / N`` and scaled by ``1 / N``. The predictive
averages the softmax over posterior draws of the network's weights.

The table compares the MAP model with the posterior predictive for several
prior precisions, on test images (NLL, accuracy) and on out-of-distribution
inputs: the test images with their pixels in a fixed random order, on which a
calibrated model should not be confident ("OOD confidence": the mean of the
largest predicted probability). The prior precision trades the two:
a broad posterior (small ``tau``) is much less confident off the data but its
draws of the whole network begin to underfit (a known effect of sampling the
network rather than its linearisation), which the Laplace estimate of the log
evidence, printed too (it needs the log-determinant), does not see.
"""

import math

import torch
from sklearn.datasets import load_digits
from torch import nn

from curvlib import KFAC, CurvatureExtractor, FisherType, KFACDamping

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
order = torch.randperm(len(x))
train, test = order[:1297], order[1297:]  # 1,297 training and 500 test images
model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
loss_fn = nn.CrossEntropyLoss()  # the per-sample negative log-likelihood, averaged

# The MAP weights: the mean loss plus (tau / 2N) |theta|^2, i.e. a prior of precision tau = 1.
n_data = len(train)
adam = torch.optim.Adam(model.parameters(), lr=3e-3, weight_decay=1.0 / n_data)
for _ in range(1500):
    batch = train[torch.randint(0, n_data, (64,))]
    adam.zero_grad()
    loss_fn(model(x[batch]), y[batch]).backward()
    adam.step()

# One pass over the training set: KFAC of the exact Fisher (the Gauss-Newton matrix),
# exact damping (KFACDamping.EIGEN: the damped operator is C + lambda I) and decay=1.0.
approx = KFAC(KFACDamping.EIGEN, decay=1.0)
extractor = CurvatureExtractor(
    model, loss_fn, stats=approx.required_stats, fisher_type=FisherType.EXACT
)
for start in range(0, n_data, 256):
    batch = train[start : start + 256]
    with extractor.collect():
        loss_fn(model(x[batch]), y[batch]).backward()
    approx.update(extractor.statistics())
model.zero_grad()
assert approx.num_samples_seen == n_data

layout = extractor.layout
theta_map = {
    layer.name: layer.to_matrix(*[p.detach() for p in layer.parameters]) for layer in layout
}
num_params = sum(layer.num_params for layer in layout)
with torch.no_grad():
    train_nll = loss_fn(model(x[train]), y[train]).item() * n_data  # summed over the data set
sq_norm = sum(float((m**2).sum()) for m in theta_map.values())


def log_evidence(tau):
    """Laplace's log p(data | tau), with theta_map fixed (a post-hoc choice of the prior)."""
    logdet_posterior = num_params * math.log(n_data) + float(approx.logdet(tau / n_data))
    return (
        -train_nll - 0.5 * tau * sq_norm + 0.5 * num_params * math.log(tau) - 0.5 * logdet_posterior
    )


def set_weights(mats):
    with torch.no_grad():
        for layer in layout:
            for param, value in zip(
                layer.parameters, layer.from_matrix(mats[layer.name]), strict=False
            ):
                param.copy_(value)


def predictive(inputs, tau, num_draws=128):
    """The posterior predictive: the softmax averaged over draws of the weights."""
    draws = approx.sample(tau / n_data, num_draws, generator=torch.Generator().manual_seed(0))
    probs = []
    with torch.no_grad():
        for s in range(num_draws):
            set_weights({n: theta_map[n] + draws[n][s] / math.sqrt(n_data) for n in theta_map})
            probs.append(model(inputs).softmax(-1))
    set_weights(theta_map)
    return torch.stack(probs).mean(0)


def nll(probs, labels):
    return float(-probs[torch.arange(len(labels)), labels].log().mean())


def report(name, test_probs, ood_probs, evidence=""):
    accuracy = float((test_probs.argmax(-1) == y[test]).float().mean())
    confidence = float(ood_probs.max(-1).values.mean())
    print(
        f"{name:<17}  {evidence:>12}  {nll(test_probs, y[test]):8.4f}  {accuracy:13.4f}  "
        f"{confidence:16.4f}"
    )


print(f"{num_params} parameters, {n_data} training images")
shuffled = x[test][:, torch.randperm(64)]  # out-of-distribution: pixels in a fixed random order
print("posterior            log evidence  test NLL  test accuracy  OOD confidence")
with torch.no_grad():
    report("MAP", model(x[test]).softmax(-1), model(shuffled).softmax(-1))
for tau in (1000.0, 300.0, 100.0, 30.0, 10.0):
    evidence = f"{log_evidence(tau):.2f}"
    report(f"Laplace, tau {tau:g}", predictive(x[test], tau), predictive(shuffled, tau), evidence)
