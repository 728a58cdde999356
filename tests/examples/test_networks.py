"""The papers' networks of ``examples/cnn.py --model``: shapes, parameter counts, KFAC steps.

Each network is built, checked against the parameter count its docs state, and
trained a few KFAC steps on a handful of tiny images on one CPU thread. The
large ones (torchvision's ResNets, VGG-11) precondition a few of their
layers in the KFAC test, for speed; the first test shows that curvlib finds a
curvature block for every convolution and linear layer of every network.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import cnn  # noqa: E402
import common  # noqa: E402
import initialisation  # noqa: E402
import networks  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:These trainable modules have no curvature block"),
    pytest.mark.usefixtures("one_thread"),
]


@dataclass(frozen=True)
class Case:
    """A ``--model`` at the image size of its papers' data set."""

    name: str
    image: tuple[int, int, int]
    parameters: int
    """At 10 classes, as the docs state it."""
    include: tuple[str, ...] | None = None
    """The layers the KFAC test preconditions (``None``: all)."""


CASES = [
    Case("cuda-convnet", (3, 32, 32), 19_178),
    Case("toy-cnn", (3, 32, 32), 824),
    Case("resnet110", (3, 32, 32), 1_727_962),
    Case("deep-linear", (1, 28, 28), 16_040),
    Case("mlp", (1, 28, 28), 4_106_920),
    Case("toy", (1, 28, 28), 9_275),
    Case("resnet18", (3, 32, 32), 11_181_642, ("layer1.0.*", "fc")),
    Case("resnet34", (3, 32, 32), 21_289_802, ("layer1.0.*", "fc")),
    Case("resnet50", (3, 32, 32), 23_528_522, ("layer1.0.*", "fc")),
    Case("vgg11", (3, 32, 32), 28_144_010, ("features.0", "classifier.6")),
]
IDS = [case.name for case in CASES]


def build(case: Case, num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    channels, side, _ = case.image
    return cnn.MODELS[case.name](channels, side, num_classes)


def curvature_modules(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameter_count_output_shape_and_curvature_layers(case: Case) -> None:
    model = build(case)
    assert sum(p.numel() for p in model.parameters()) == case.parameters
    with torch.no_grad():
        assert model(torch.rand(2, *case.image)).shape == (2, 10)
    # curvlib gives every convolution and linear layer a curvature block
    opt = common.build_optimizer("kfac", model, nn.CrossEntropyLoss(), common.OptimConfig(lr=0.1))
    names = [layer.name for layer in opt.layers]  # type: ignore[attr-defined]
    assert sorted(names) == sorted(curvature_modules(model))


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_kfac_trains_a_few_steps(case: Case) -> None:
    model = build(case)
    x, y = torch.rand(8, *case.image), torch.arange(8) % 10
    loss_fn = nn.CrossEntropyLoss()
    config = common.OptimConfig(lr=0.1, t_cov=1, t_inv=2, warmup=0)
    opt = common.build_optimizer("kfac", model, loss_fn, config, include=case.include)
    names = {layer.name for layer in opt.layers}  # type: ignore[attr-defined]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [common.step_optimizer(opt, lambda: loss_fn(model(x), y)) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses))), losses
    assert opt.last_stats["inverse_failures"] == 0  # type: ignore[attr-defined]
    assert 0.0 < opt.last_stats["kl_clip_factor"] <= 1.0  # type: ignore[attr-defined]
    for name in names:
        weight = f"{name}.weight"
        assert not torch.equal(dict(model.named_parameters())[weight], before[weight]), weight
    if case.include is None:  # the small networks: three steps on one batch lower its loss
        with torch.no_grad():
            assert float(loss_fn(model(x), y)) < losses[0], losses


def test_cuda_convnet_layout() -> None:
    for channels, side in ((3, 32), (1, 28)):
        net = networks.cuda_convnet(channels, side, 100)
        convs = [m for m in net if isinstance(m, nn.Conv2d)]
        assert [(c.out_channels, c.kernel_size) for c in convs] == [
            (32, (3, 3)), (32, (3, 3)), (64, (2, 2))
        ]  # fmt: skip
        assert [m.kernel_size for m in net if isinstance(m, nn.MaxPool2d)] == [3, 3]
        assert sum(isinstance(m, nn.BatchNorm2d) for m in net) == 2
        assert net(torch.rand(2, channels, side, side)).shape == (2, 100)
    with pytest.raises(ValueError, match="at least 26x26"):
        networks.cuda_convnet(3, 24, 10)
    assert networks.toy_cnn(1, 28, 10)(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ValueError, match="at least 27x27"):
        networks.toy_cnn(3, 26, 10)


def test_resnet110_has_three_stages_of_eighteen_basic_blocks() -> None:
    model = networks.cifar_resnet(110, 3, 10)
    blocks = [m for m in model if isinstance(m, networks.CifarBasicBlock)]
    assert len(blocks) == 54
    assert [b.conv2.out_channels for b in blocks[::18]] == [16, 32, 64]
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs + 1 == 110  # the stem, two per block, the linear layer
    x = torch.rand(4, 3, 32, 32)
    assert model(x).shape == (4, 10)
    shortcut = blocks[18].shortcut(torch.ones(1, 16, 32, 32))  # the first block of stage 2
    assert shortcut.shape == (1, 32, 16, 16)
    assert shortcut[:, 8:24].eq(1).all() and shortcut[:, :8].eq(0).all()
    with pytest.raises(ValueError, match="6n \\+ 2"):
        networks.cifar_resnet(100, 3, 10)


def test_the_papers_mlps_have_batchnorm_and_no_other_nonlinearity() -> None:
    for make, depth in ((networks.deep_linear, 64), (networks.bn_mlp, 13)):
        model = make(784, 10)
        kinds = {type(m) for m in model}
        assert kinds == {nn.Flatten, nn.Linear, nn.BatchNorm1d}
        assert sum(isinstance(m, nn.Linear) for m in model) == depth
        assert sum(isinstance(m, nn.BatchNorm1d) for m in model) == depth - 1
    toy = networks.toy_net(784, 10)
    widths = [m.out_features for m in toy if isinstance(m, nn.Linear)]
    assert widths == [10, 30, 20, 15, 10] and sum(isinstance(m, nn.Tanh) for m in toy) == 4


def test_vgg11_computes_what_the_papers_unchanged_vgg11_computes() -> None:
    """On 32x32 images, torchvision's 25,088-input classifier sees 49 copies of 512 features."""
    from torchvision.models import vgg11

    torch.manual_seed(0)
    ours = networks.vgg11(3, 10).eval()
    theirs = vgg11(num_classes=10).eval()
    theirs.features.load_state_dict(ours.features.state_dict())
    state = ours.classifier.state_dict()
    state["0.weight"] = theirs.classifier[0].weight.detach().view(4096, 512, 49).sum(-1)
    state["0.bias"] = theirs.classifier[0].bias.detach()
    ours.classifier.load_state_dict(state)
    theirs.classifier[3:].load_state_dict(ours.classifier[3:].state_dict())
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-5)


def test_cli_trains_cuda_convnet_with_the_papers_initialisation(tmp_path: Path) -> None:
    argv = [
        "--model", "cuda_convnet", "--init", "xavier-uniform", "--bias-init", "0.01",
        "--num-train", "80", "--num-test", "40", "--batch-size", "40", "--num-epochs", "1",
        "--t-cov", "1", "--t-inv", "2", "--no-progress", "--out", str(tmp_path),
    ]  # fmt: skip
    args = cnn.build_argparser().parse_args(argv)
    assert args.model == "cuda-convnet"
    model = cnn.make_network(args, 3, 32, 10)
    biases = [m.bias for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    assert all(torch.equal(b, torch.full_like(b, 0.01)) for b in biases)
    final = cnn.main(argv)[0].final
    assert final["inverse_failures"] == 0 and final["train_loss"] is not None


def test_default_init_keeps_the_networks_own_weights() -> None:
    args = cnn.build_argparser().parse_args(["--model", "toy"])
    torch.manual_seed(0)
    ours = cnn.make_network(args, 1, 28, 10)
    torch.manual_seed(0)
    plain = networks.toy_net(784, 10)
    for p, q in zip(ours.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p, q)
    model = networks.toy_net(784, 10)
    initialisation.initialise(model, "sparse", bias=None)
    first = model[1]
    assert (first.weight != 0).sum(dim=1).tolist() == [15] * 10
    assert not torch.equal(first.bias, torch.zeros_like(first.bias))  # kept torch's biases


def test_vgg11_refuses_small_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.examples.test_autoencoder import write_tiny_mnist

    write_tiny_mnist(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cnn.main(["--model", "vgg11", "--data", "mnist", "--data-root", str(tmp_path),
                  "--out", str(tmp_path / "o")])  # fmt: skip
    assert exc.value.code == 2
    assert "needs images of at least 32x32 pixels, got 28x28" in capsys.readouterr().err
