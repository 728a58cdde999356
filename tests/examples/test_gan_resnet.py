"""The WGAN-GP ResNet generator and critic (``examples/gan_resnet.py``) and ``--arch resnet``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))

import dcgan_kfac  # noqa: E402
import gan_models  # noqa: E402
import gan_resnet  # noqa: E402
import gan_training  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:These trainable modules have no curvature block"),
    pytest.mark.usefixtures("one_thread"),
]

TINY = [
    "--arch", "resnet", "--width", "4", "--nz", "8", "--num-train", "32", "--num-test", "16",
    "--batch-size", "8", "--critic-steps", "2", "--num-epochs", "1", "--fd-dims", "4",
    "--t-cov", "1", "--t-inv", "2", "--no-progress",
]  # fmt: skip


def count(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_the_papers_sizes_have_the_papers_parameter_counts() -> None:
    # Counted by hand from gan_cifar_resnet.py (unconditional, DIM_G = DIM_D = 128):
    # generator: Linear 128 -> 4*4*128 (264,192); per up block two BN (2 x 256), two 3x3
    # convs (2 x 147,584) and a 1x1 shortcut (16,512); output BN (256) and 3x3 conv to 3
    # channels (3,459). Critic: first block 3,584 + 147,584 + 512, down block 2 x 147,584
    # + 16,512, two plain blocks 2 x 147,584 each, Linear 128 -> 1 (129).
    g = gan_resnet.resnet_generator(128, 3, 32)
    d = gan_resnet.resnet_critic(3, 32)
    assert count(g) == 264_192 + 3 * (2 * 256 + 2 * 147_584 + 16_512) + 256 + 3_459
    assert count(g) == 1_204_483
    assert count(d) == (3_584 + 147_584 + 512) + (2 * 147_584 + 16_512) + 4 * 147_584 + 129
    assert count(d) == 1_053_825
    assert sum(isinstance(m, gan_resnet.UpBlock) for m in g.modules()) == 3
    blocks = (gan_resnet.FirstDownBlock, gan_resnet.DownBlock, gan_resnet.Block)
    assert sum(isinstance(m, blocks) for m in d.modules()) == 4
    assert not any(isinstance(m, nn.BatchNorm2d | nn.LayerNorm) for m in d.modules())


def test_shapes_through_the_blocks() -> None:
    torch.manual_seed(0)
    g = gan_resnet.resnet_generator(16, 3, 32, width=8)
    d = gan_resnet.resnet_critic(3, 32, width=8)
    x = torch.randn(5, 16)
    sides = []
    for layer in g:
        x = layer(x)
        if isinstance(layer, nn.Unflatten | gan_resnet.UpBlock):
            sides.append(tuple(x.shape[1:]))
    assert sides == [(8, 4, 4), (8, 8, 8), (8, 16, 16), (8, 32, 32)]
    assert x.shape == (5, 3, 32, 32) and float(x.detach().abs().max()) < 1
    y = x
    sides = []
    for layer in d:
        y = layer(y)
        if isinstance(layer, gan_resnet.FirstDownBlock | gan_resnet.DownBlock | gan_resnet.Block):
            sides.append(tuple(y.shape[1:]))
    assert sides == [(8, 16, 16), (8, 8, 8), (8, 8, 8), (8, 8, 8)]
    assert y.shape == (5, 1)
    # Other sides that are multiples of 8 work too: the generator starts at side / 8.
    assert gan_resnet.resnet_generator(4, 1, 16, width=4)(torch.randn(2, 4)).shape == (2, 1, 16, 16)


def test_the_critic_scores_each_image_on_its_own() -> None:
    """No batch coupling: the gradient penalty needs per-sample scores."""
    torch.manual_seed(0)
    d = gan_resnet.resnet_critic(3, 16, width=4)
    x = torch.randn(6, 3, 16, 16)
    torch.testing.assert_close(d(x)[:2], d(x[:2]))


def test_a_side_that_is_not_a_multiple_of_8_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        gan_resnet.resnet_critic(1, 28)
    with pytest.raises(SystemExit) as exc:
        dcgan_kfac.main([*TINY, "--data", "curves"])
    assert exc.value.code == 2
    assert "multiple of 8 (32 in the paper), got 28" in capsys.readouterr().err


def test_arch_resnet_defaults_to_the_papers_game() -> None:
    parser = dcgan_kfac.build_argparser()
    args = parser.parse_args(["--arch", "resnet"])
    dcgan_kfac.check_args(parser, args)
    assert (args.gan, args.nz, args.width, args.data) == ("wgan-gp", 128, 128, "synthetic")
    assert args.fisher == "empirical"
    args = parser.parse_args([])
    dcgan_kfac.check_args(parser, args)
    assert (args.gan, args.nz, args.width, args.data) == ("bce", 32, 16, "curves")


def test_kfac_preconditions_every_conv_and_linear_layer_of_both_networks() -> None:
    torch.manual_seed(0)
    parser = dcgan_kfac.build_argparser()
    args = parser.parse_args([*TINY, "--kfac-on", "both"])
    dcgan_kfac.check_args(parser, args)
    gan = gan_models.GAN(*gan_models.networks(args, 3, 32))
    opts = gan_training.build_optimizers(args, args.optim, gan, nn.MSELoss())
    for key, net, prefix in (("g", gan.generator, "generator."), ("d", gan.critic, "")):
        layers = {layer.name for layer in opts[key].layers}  # type: ignore[attr-defined]
        wanted = {
            prefix + name for name, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)
        }
        assert wanted <= layers, wanted - layers


def test_a_few_kfac_steps_on_both_networks(tmp_path: Path) -> None:
    (result,) = dcgan_kfac.main([*TINY, "--kfac-on", "both", "--out", str(tmp_path)])
    assert result.final["steps"] == 32 // 8 // 2
    for key in ("g_loss", "d_loss", "fd"):
        assert result.final[key] is not None  # finite
    for name in ("telemetry.json", "telemetry_critic.json"):
        steps = json.loads((tmp_path / name).read_text())
        assert steps and all(s["kl_clip_factor"] is not None for s in steps)
    assert (tmp_path / "samples" / "epoch_001.png").is_file()
