"""Bad input gets a clear error, and misuse of collect() is caught."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from curvlib.core import CurvatureStatistics, FisherType, StatKind
from curvlib.extract import Backend, CurvatureExtractor, UnsupportedPolicy


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(6, 4), torch.randint(0, 3, (6,))


def test_functional_loss_is_rejected() -> None:
    with pytest.raises(TypeError, match="Functional losses"):
        CurvatureExtractor(_mlp(), F.cross_entropy)  # type: ignore[arg-type]


def test_unsupported_loss_is_rejected() -> None:
    with pytest.raises(TypeError, match="Unsupported loss L1Loss"):
        CurvatureExtractor(_mlp(), nn.L1Loss())


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        (nn.MSELoss(reduction="none"), "reduction='none'"),
        (nn.CrossEntropyLoss(label_smoothing=0.1), "label smoothing"),
        (nn.CrossEntropyLoss(weight=torch.ones(3)), "class weights"),
        (nn.BCEWithLogitsLoss(pos_weight=torch.ones(3)), "pos_weight"),
    ],
)
def test_unsupported_loss_options(loss: nn.Module, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CurvatureExtractor(_mlp(), loss)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mc_samples": 0}, "mc_samples"),
        ({"mc_samples": 1.5}, "mc_samples"),
        ({"stats_fraction": 0.0}, "stats_fraction"),
        ({"stats_fraction": 1.5}, "stats_fraction"),
        ({"fisher_type": "natural"}, "FisherType.MC"),
        ({"backend": "jax"}, "Backend.AUTOGRAD"),
        ({"stats": ()}, "stats is empty"),
    ],
)
def test_bad_hyper_parameters(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CurvatureExtractor(_mlp(), nn.CrossEntropyLoss(), **kwargs)  # type: ignore[arg-type]


def test_strings_are_accepted_for_enums() -> None:
    ex = CurvatureExtractor(_mlp(), nn.CrossEntropyLoss(), fisher_type="empirical")
    assert ex.fisher_type is FisherType.EMPIRICAL


def test_empty_selection_is_an_error() -> None:
    with pytest.raises(ValueError, match="No curvature layers"):
        CurvatureExtractor(_mlp(), nn.CrossEntropyLoss(), include=["nothing*"])


def _with_embedding() -> nn.Module:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.norm = nn.LayerNorm(4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.norm(self.embed(x)))

    return Net()


def test_unsupported_modules_are_named() -> None:
    with pytest.raises(ValueError, match=r"embed \(Embedding\).*norm \(LayerNorm\)"):
        CurvatureExtractor(_with_embedding(), nn.CrossEntropyLoss(), unsupported="raise")
    with pytest.warns(UserWarning, match=r"embed \(Embedding\)"):
        CurvatureExtractor(_with_embedding(), nn.CrossEntropyLoss())
    ex = CurvatureExtractor(
        _with_embedding(), nn.CrossEntropyLoss(), unsupported=UnsupportedPolicy.IGNORE
    )
    assert ex.layout.names == ("head",)


def test_backpack_backend_names_modules_it_cannot_handle() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))
    with pytest.raises(ValueError, match=r"1 \(GELU\)"):
        CurvatureExtractor(model, nn.CrossEntropyLoss(), backend=Backend.BACKPACK)


def test_auto_backend_handles_modules_backpack_lacks() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.GELU(), nn.Linear(5, 3))
    loss_fn = nn.CrossEntropyLoss()
    ex = CurvatureExtractor(model, loss_fn, fisher_type="exact")
    x, y = _data()
    with ex.collect():
        loss_fn(model(x), y).backward()
    assert ex.statistics()["0"].kronecker is not None


def test_backpack_backend_rejects_train_mode_batchnorm() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    loss_fn = nn.CrossEntropyLoss()
    ex = CurvatureExtractor(
        model, loss_fn, backend="backpack", unsupported="ignore", fisher_type="mc"
    )
    with pytest.raises(RuntimeError, match=r"BatchNorm in train mode \(1\)"), ex.collect():
        pass


def test_module_called_twice_is_named() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.lin(self.lin(x)))

    model = Twice()
    loss_fn = nn.CrossEntropyLoss()
    ex = CurvatureExtractor(model, loss_fn)
    x, y = _data()
    with pytest.raises(RuntimeError, match=r"'lin' .*ran twice"), ex.collect():
        loss_fn(model(x), y).backward()
    assert not model.lin._forward_hooks


def test_forward_without_backward_is_an_error_and_leaks_nothing() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    ex = CurvatureExtractor(model, loss_fn)
    x, y = _data()
    with pytest.raises(RuntimeError, match="without a backward pass"), ex.collect():
        loss_fn(model(x), y)
    for module in [*model.modules(), loss_fn]:
        assert not hasattr(module, "input0")
        assert not hasattr(module, "output")


@pytest.mark.parametrize(
    ("backend", "match"),
    [(Backend.BACKPACK, "did not start from the loss module"), (Backend.AUTOGRAD, "loss_fn")],
)
def test_missing_loss_call_is_an_error(backend: Backend, match: str) -> None:
    model = _mlp()
    ex = CurvatureExtractor(model, nn.CrossEntropyLoss(), backend=backend)
    x, y = _data()
    with pytest.raises(RuntimeError, match=match), ex.collect():
        F.cross_entropy(model(x), y).backward()


def test_loss_called_twice_is_an_error() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    ex = CurvatureExtractor(model, loss_fn)
    x, y = _data()
    with pytest.raises(RuntimeError, match="loss_fn ran twice"), ex.collect():
        out = model(x)
        loss_fn(out, y)
        loss_fn(out, y)


def test_statistics_before_collect_and_nesting() -> None:
    ex = CurvatureExtractor(_mlp(), nn.CrossEntropyLoss())
    with pytest.raises(RuntimeError, match="No statistics yet"):
        ex.statistics()
    with pytest.raises(RuntimeError, match="nested"), ex.collect(), ex.collect():
        pass


@pytest.mark.parametrize(
    ("loss_fn", "target", "match"),
    [
        (nn.MSELoss(), torch.randn(6, 2), "target shape"),
        (nn.BCEWithLogitsLoss(), torch.rand(6, 1), "target shape"),
        (nn.CrossEntropyLoss(), torch.randint(0, 3, (6, 1)), "do not fit"),
        (nn.CrossEntropyLoss(), torch.rand(6, 3), "class-probability"),
    ],
)
def test_target_shape_mismatch(loss_fn: nn.Module, target: torch.Tensor, match: str) -> None:
    model = _mlp()
    ex = CurvatureExtractor(model, loss_fn)
    x, _ = _data()
    with pytest.raises(ValueError, match=match), ex.collect():
        loss_fn(model(x), target)


@pytest.mark.parametrize("backend", [Backend.BACKPACK, Backend.AUTOGRAD])
def test_inplace_activations_are_handled(backend: Backend) -> None:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 5), nn.ELU(), nn.Linear(5, 3))
    inplace = nn.Sequential(
        nn.Linear(4, 5),
        nn.ReLU(inplace=True),
        nn.Linear(5, 5),
        nn.ELU(inplace=True),
        nn.Linear(5, 3),
    )
    inplace.load_state_dict(plain.state_dict())
    loss_fn = nn.CrossEntropyLoss()
    x, y = _data()
    results = []
    for model in (plain, inplace):
        ex = CurvatureExtractor(model, loss_fn, fisher_type="exact", backend=backend)
        with ex.collect():
            loss_fn(model(x), y).backward()
        results.append(ex.statistics())
    for name in ("0", "2", "4"):
        a, b = (r[name].kronecker for r in results)
        assert a is not None and b is not None
        torch.testing.assert_close(a.G, b.G)
        torch.testing.assert_close(a.A, b.A)
    assert inplace[1].inplace and inplace[3].inplace


def test_only_requested_statistics_are_computed() -> None:
    model, loss_fn = _mlp(), nn.CrossEntropyLoss()
    ex = CurvatureExtractor(model, loss_fn, stats={StatKind.PER_SAMPLE_IO})
    x, y = _data()
    with ex.collect():
        loss_fn(model(x), y).backward()
    stats = ex.statistics()["0"]
    assert stats.kronecker is None and stats.grads is None and stats.io is not None


def test_per_sample_statistics_with_train_mode_batchnorm_are_an_error() -> None:
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    loss_fn = nn.CrossEntropyLoss()
    ex = CurvatureExtractor(model, loss_fn, stats={StatKind.PER_SAMPLE_IO}, unsupported="ignore")
    with pytest.raises(RuntimeError, match=r"\(1\) couples the samples.*eval mode"), ex.collect():
        pass
    model.eval()
    x, y = _data()
    with ex.collect():
        loss_fn(model(x), y).backward()
    assert ex.statistics()["0"].io is not None


class _SharedActivation(nn.Module):
    """Two Linear layers with one ReLU module called twice (as torchvision's ResNet blocks)."""

    def __init__(self, shared: bool) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.act1 = nn.ReLU(inplace=True)
        self.act2 = self.act1 if shared else nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.act2(self.b(self.act1(self.a(x)))))


def _stats_of(shared: bool, fisher: str, backend: str) -> CurvatureStatistics:
    torch.manual_seed(0)
    x, y = _data()
    model = _SharedActivation(shared)
    loss_fn = nn.CrossEntropyLoss()
    ex = CurvatureExtractor(model, loss_fn, fisher_type=fisher, backend=backend, seed=1)
    with ex.collect():
        loss_fn(model(x), y).backward()
    return ex.statistics()


@pytest.mark.parametrize(
    ("fisher", "backend"),
    [("empirical", "auto"), ("empirical", "backpack"), ("mc", "autograd"), ("mc", "auto")],
)
def test_a_reused_activation_module_is_fine_where_backpack_does_not_see_it(
    fisher: str, backend: str
) -> None:
    """Empirical statistics read the layers' own output gradients: no columns through the ReLU."""
    shared, separate = _stats_of(True, fisher, backend), _stats_of(False, fisher, backend)
    for name, stats in shared.layers.items():
        other = separate.layers[name]
        assert stats.kronecker is not None and other.kronecker is not None
        torch.testing.assert_close(stats.kronecker.G, other.kronecker.G)
        torch.testing.assert_close(stats.kronecker.A, other.kronecker.A)


def test_a_reused_activation_module_under_backpack_columns_names_the_fix() -> None:
    with pytest.raises(RuntimeError, match=r"'act1' \(ReLU\) ran twice.*Backend.AUTOGRAD"):
        _stats_of(True, "exact", "auto")


@pytest.mark.parametrize("fisher", list(FisherType), ids=lambda f: f.value)
@pytest.mark.parametrize("backend", [Backend.BACKPACK, Backend.AUTOGRAD])
def test_another_instance_of_the_loss_is_named(backend: Backend, fisher: FisherType) -> None:
    """Every Fisher: EMPIRICAL reads the layers' gradients before the loss is checked."""
    model = _mlp()
    ex = CurvatureExtractor(model, nn.CrossEntropyLoss(), backend=backend, fisher_type=fisher)
    x, y = _data()
    with (
        pytest.raises(RuntimeError, match=r"another CrossEntropyLoss instance.*loss_fn = nn"),
        ex.collect(),
    ):
        nn.CrossEntropyLoss()(model(x), y).backward()
    # The instance it was given still works, and is the one it hands back.
    with ex.collect():
        ex.loss_fn(model(x), y).backward()
    assert ex.statistics().layers.keys() == {"0", "2"}


@pytest.mark.parametrize("fisher", list(FisherType), ids=lambda f: f.value)
def test_a_functional_loss_inside_collect_names_the_loss_instance(fisher: FisherType) -> None:
    """Whichever hook notices first (the loss, a layer's backward, the block's end)."""
    model = _mlp()
    ex = CurvatureExtractor(model, nn.CrossEntropyLoss(), fisher_type=fisher)
    x, y = _data()
    with (
        pytest.raises(RuntimeError, match=r"^(?!internal).*loss_fn"),  # names the fix
        ex.collect(),
    ):
        F.cross_entropy(model(x), y).backward()
