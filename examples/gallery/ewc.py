"""Elastic weight consolidation (EWC): learn digits 5-9 without forgetting digits 0-4.

A network with one shared hidden layer and one output head per task learns
task A (digits 0-4), then task B (digits 5-9). Trained on B alone, the shared
layer drifts and task A's accuracy drops. EWC adds the penalty
``strength / 2 * N * (theta - theta_A)^T C (theta - theta_A)`` with ``C`` the
KFAC approximation of task A's Fisher, fitted over all of A's images in one
pass (``decay=1.0``), so that ``N C`` is the Fisher of the data set; the
penalty is differentiable through ``approx.matvec``.
"""

import copy

import torch
from sklearn.datasets import load_digits
from torch import nn

from curvlib import KFAC, CurvatureExtractor

torch.manual_seed(0)
digits = load_digits()
x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
y = torch.tensor(digits.target)
order = torch.randperm(len(x))
train, test = order[:1297], order[1297:]
task_a = {split: idx[y[idx] < 5] for split, idx in (("train", train), ("test", test))}
task_b = {split: idx[y[idx] >= 5] for split, idx in (("train", train), ("test", test))}

body = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
model_a = nn.Sequential(body, nn.Linear(64, 5))  # classes 0-4
model_b = nn.Sequential(body, nn.Linear(64, 5))  # classes 5-9, the same hidden layer
loss_fn = nn.CrossEntropyLoss()


def train_task(model, task, offset, steps=600, penalty=None):
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(1)  # the same batches with and without EWC
    for _ in range(steps):
        batch = task["train"][torch.randint(0, len(task["train"]), (64,), generator=generator)]
        opt.zero_grad()
        loss = loss_fn(model(x[batch]), y[batch] - offset)
        if penalty is not None:
            loss = loss + penalty()
        loss.backward()
        opt.step()


def accuracy(model, task, offset):
    with torch.no_grad():
        predicted = model(x[task["test"]]).argmax(-1) + offset
    return float((predicted == y[task["test"]]).float().mean())


train_task(model_a, task_a, offset=0)
print(f"task A (digits 0-4) after training on A: accuracy {accuracy(model_a, task_a, 0):.4f}")

# Task A's Fisher: KFAC over all of A's training images, one pass, the mean over batches.
approx = KFAC(decay=1.0)
extractor = CurvatureExtractor(model_a, loss_fn, stats=approx.required_stats)
for start in range(0, len(task_a["train"]), 256):
    batch = task_a["train"][start : start + 256]
    with extractor.collect():  # the loss instance given to the extractor
        loss_fn(model_a(x[batch]), y[batch]).backward()
    approx.update(extractor.statistics())
model_a.zero_grad()
n_data = approx.num_samples_seen
layout = extractor.layout  # layers "0.0" (shared) and "1" (head A)
theta_a = {layer.name: layer.to_matrix(*[p.detach() for p in layer.parameters]) for layer in layout}


def ewc_penalty(strength):
    delta = {
        layer.name: layer.to_matrix(*layer.parameters) - theta_a[layer.name] for layer in layout
    }
    curvature = approx.matvec(delta)  # C delta, differentiable in delta
    return 0.5 * strength * n_data * sum((delta[n] * curvature[n]).sum() for n in delta)


saved = copy.deepcopy(body.state_dict()), copy.deepcopy(model_b[1].state_dict())
print("training on B        accuracy on A  accuracy on B")
for name, penalty in (("without EWC", None), ("with EWC", lambda: ewc_penalty(strength=1.0))):
    body.load_state_dict(saved[0])  # start from the weights learnt on A each time
    model_b[1].load_state_dict(saved[1])
    train_task(model_b, task_b, offset=5, penalty=penalty)
    print(f"{name:<19}  {accuracy(model_a, task_a, 0):13.4f}  {accuracy(model_b, task_b, 5):13.4f}")
