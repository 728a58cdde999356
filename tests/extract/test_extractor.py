"""The extractor as a component: protocol, resumable randomness, dtype, sub-batches."""

from __future__ import annotations

import io

import torch
from torch import nn

from curvlib.core import CurvatureStatistics, Extractor, StatKind
from curvlib.extract import CurvatureExtractor


def _setup() -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Sigmoid(), nn.Linear(6, 5))
    return model, nn.BCEWithLogitsLoss(), torch.randn(10, 4), torch.rand(10, 5)


def _collect(ex: CurvatureExtractor, model: nn.Module, loss_fn: nn.Module, x, y):  # type: ignore[no-untyped-def]
    with ex.collect():
        loss_fn(model(x), y).backward()
    model.zero_grad()
    return ex.statistics()


def test_implements_the_extractor_protocol() -> None:
    model, loss_fn, _, _ = _setup()
    assert isinstance(CurvatureExtractor(model, loss_fn), Extractor)


def test_state_dict_resumes_the_random_stream() -> None:
    model, loss_fn, x, y = _setup()
    kwargs = {"stats": {StatKind.PER_SAMPLE_IO}, "mc_samples": 3, "stats_fraction": 0.5, "seed": 7}
    ex = CurvatureExtractor(model, loss_fn, **kwargs)  # type: ignore[arg-type]
    _collect(ex, model, loss_fn, x, y)
    buffer = io.BytesIO()
    torch.save(ex.state_dict(), buffer)
    expected = _collect(ex, model, loss_fn, x, y)

    resumed = CurvatureExtractor(model, loss_fn, **kwargs)  # type: ignore[arg-type]
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    got = _collect(resumed, model, loss_fn, x, y)
    first = CurvatureExtractor(model, loss_fn, **kwargs)  # type: ignore[arg-type]
    fresh = _collect(first, model, loss_fn, x, y)
    for name in ("0", "2"):
        a, b, c = (s[name].io for s in (expected, got, fresh))
        assert a is not None and b is not None and c is not None
        assert torch.equal(a.output_grads, b.output_grads)
        assert torch.equal(a.inputs, b.inputs)
        assert not torch.equal(a.output_grads, c.output_grads)  # the stream moved on


def test_sub_batch_size_and_dtype() -> None:
    model, loss_fn, x, y = _setup()
    ex = CurvatureExtractor(
        model,
        loss_fn,
        stats={StatKind.KRONECKER, StatKind.PER_SAMPLE_IO},
        stats_fraction=0.25,
        dtype=torch.float64,
    )
    stats: CurvatureStatistics = _collect(ex, model, loss_fn, x, y)
    assert stats.num_samples == 3  # ceil(0.25 * 10)
    layer = stats["0"]
    assert layer.io is not None and layer.kronecker is not None
    assert layer.io.inputs.shape == (3, 1, 5)
    assert layer.kronecker.A.dtype == torch.float64
    rows = [int((x[:, :1] == a[0, :1]).nonzero()[0, 0]) for a in layer.io.inputs]
    sub = torch.cat([x[rows].double(), torch.ones(3, 1, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(layer.kronecker.A, sub.T @ sub / 3)


def test_no_grad_forward_inside_collect_is_ignored() -> None:
    model, loss_fn, x, y = _setup()
    ex = CurvatureExtractor(model, loss_fn, fisher_type="exact")
    with ex.collect():
        with torch.no_grad():
            model(x[:2])  # e.g. an evaluation forward: neither counted nor stored
        loss_fn(model(x), y).backward()
    assert ex.statistics().num_samples == 10
