"""KFAC on an existing model: swap the optimizer, wrap the backward pass in ``record()``.

An MLP classifies scikit-learn's bundled 8x8 digits (1,797 real images). The
same model, data order and epochs train once with curvlib's KFAC at the library
defaults and twice with Adam (its usual learning rate 1e-3, and 1e-2, the best
of 1e-3, 3e-3 and 1e-2 here); the script prints the mean training loss of every
epoch (each batch's loss before its step).
"""

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from curvlib import KFAC, PreconditionedOptimizer

digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixels in [0, 1]
y = torch.tensor(digits.target)
EPOCHS = 8
SEED = 0


def make_model_and_loader():
    torch.manual_seed(SEED)  # the same initial weights and batches for both optimizers
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)
    return model, loader


# -- KFAC: the three lines that differ from an ordinary training loop are marked --
model, loader = make_model_and_loader()
loss_fn = nn.CrossEntropyLoss()  # this instance is the one called inside record()
opt = PreconditionedOptimizer(model, KFAC(), loss_fn=loss_fn)  # (1) the optimizer
kfac_losses = []
for _ in range(EPOCHS):
    total = 0.0
    for xb, yb in loader:
        opt.zero_grad()
        with opt.record():  # (2) statistics are collected here when they are due
            loss = loss_fn(model(xb), yb)
            loss.backward()
        opt.step()  # (3) the preconditioned, KL-clipped step
        total += loss.item() * len(xb)
    kfac_losses.append(total / len(x))


# -- Adam: the same loop without record(), at its usual learning rate and at the best
# of 1e-3, 3e-3 and 1e-2 on this task --
def train_adam(lr):
    model, loader = make_model_and_loader()
    adam = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for _ in range(EPOCHS):
        total = 0.0
        for xb, yb in loader:
            adam.zero_grad()
            loss = loss_fn(model(xb), yb)
            loss.backward()
            adam.step()
            total += loss.item() * len(xb)
        losses.append(total / len(x))
    return losses


adam_losses, tuned_losses = train_adam(1e-3), train_adam(1e-2)

print("epoch  KFAC (defaults)  Adam (lr 1e-3)  Adam (lr 1e-2)")
for epoch, losses in enumerate(zip(kfac_losses, adam_losses, tuned_losses, strict=True), start=1):
    print(f"{epoch:5d}  {losses[0]:15.4f}  {losses[1]:14.4f}  {losses[2]:14.4f}")
