r"""The documentation's diagrams, drawn from curvlib's own layouts and statistics.

Run from the repository root::

    python benchmarks/diagrams.py            # writes docs/figures/{layout,rearrangement}.png

Nothing here is drawn by hand: the $[W \mid b]$ layouts come from
``CurvatureLayer.to_matrix`` applied to layers whose parameters hold their own
storage index, and the rearrangement figure from the exact Fisher block of a
small layer (EXACT statistics of a seeded MLP, float64), KFAC's $G \otimes A$
and KPSVD's best Kronecker product of the same batch.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from curvlib import KFAC, KPSVD, CurvatureExtractor, FisherType, StatKind
from curvlib.approx import exact_block
from curvlib.core import ModelLayout

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "docs" / "figures"


def indexed_matrix(module: nn.Module) -> Tensor:
    r"""The layer's $[W \mid b]$ matrix, each entry its parameter's storage index."""
    layout = ModelLayout.from_model(nn.Sequential(module))
    layer = layout.layers[0]
    weight = torch.arange(module.weight.numel(), dtype=torch.float64)
    bias = weight.numel() + torch.arange(module.bias.numel(), dtype=torch.float64)
    return layer.to_matrix(weight.reshape(module.weight.shape), bias)


def rearranged(block: Tensor, out_dim: int, in_dim: int) -> Tensor:
    r"""$\mathcal R(F)$: row $(o, o')$, column $(i, i')$ holds $F_{(o,i),(o',i')}$."""
    f = block.reshape(out_dim, in_dim, out_dim, in_dim)
    return f.permute(0, 2, 1, 3).reshape(out_dim * out_dim, in_dim * in_dim)


def fisher_blocks() -> dict[str, Tensor | int]:
    """The exact block of a 3 x 4 ``[W | b]`` layer, its KFAC and its KPSVD, in float64."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    loss_fn = nn.CrossEntropyLoss()
    x, y = torch.randn(64, 3, dtype=torch.float64), torch.randint(0, 3, (64,))
    stats = {StatKind.KRONECKER, StatKind.PER_SAMPLE_IO}
    extractor = CurvatureExtractor(model, loss_fn, stats=stats, fisher_type=FisherType.EXACT)
    with extractor.collect():
        loss_fn(model(x), y).backward()
    statistics = extractor.statistics()
    kfac, kpsvd = KFAC(), KPSVD()
    kfac.update(statistics)
    kpsvd.update(statistics)
    name = "2"
    layer = statistics.layers[name].layer
    return {
        "exact": exact_block(statistics.layers[name]),
        "kfac": kfac.to_dense(name),
        "kpsvd": kpsvd.to_dense(name),
        "out": layer.out_dim,
        "in": layer.in_dim_aug,
    }


def draw_layout(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    linear = indexed_matrix(nn.Linear(4, 3))
    conv = indexed_matrix(nn.Conv2d(2, 2, kernel_size=2))
    fig, axes = plt.subplots(
        1, 2, figsize=(12, 3.4), gridspec_kw={"width_ratios": [5, 9]}, constrained_layout=True
    )
    panels = [
        (axes[0], linear, "nn.Linear(4, 3): [W | b] is 3 x 5", [f"in {i}" for i in range(4)]),
        (
            axes[1],
            conv,
            "nn.Conv2d(2, 2, kernel_size=2): [W | b] is 2 x 9",
            [f"c{c} ({h},{w})" for c in range(2) for h in range(2) for w in range(2)],
        ),
    ]
    for ax, mat, title, columns in panels:
        rows, cols = mat.shape
        shade = torch.zeros(rows, cols)
        shade[:, -1] = 1.0
        ax.imshow(shade, cmap="Blues", vmin=0, vmax=2.5, aspect="equal")
        position = 0
        for r in range(rows):
            for c in range(cols):
                storage = "b" if c == cols - 1 else "W"
                ax.text(c, r - 0.12, f"{storage}[{int(mat[r, c])}]", ha="center", fontsize=9)
                ax.text(c, r + 0.25, f"vec {position}", ha="center", fontsize=7, color="grey")
                position += 1
        ax.set_xticks(range(cols), [*columns, "bias"], rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(rows), [f"out {r}" for r in range(rows)], fontsize=8)
        ax.set_xticks([c - 0.5 for c in range(1, cols)], minor=True)
        ax.set_yticks([r - 0.5 for r in range(1, rows)], minor=True)
        ax.grid(which="minor", color="white", linewidth=2)
        ax.tick_params(which="minor", length=0)
        ax.set_title(title, fontsize=10)
    fig.suptitle(
        "The [W | b] matrix of a layer: W[k] and b[k] are the k-th entries of the parameter "
        "tensors as torch stores them; grey: the position in the row-major vectorisation",
        fontsize=10,
    )
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_rearrangement(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = fisher_blocks()
    exact, kfac, kpsvd = blocks["exact"], blocks["kfac"], blocks["kpsvd"]
    assert isinstance(exact, Tensor) and isinstance(kfac, Tensor) and isinstance(kpsvd, Tensor)
    out_dim, in_dim = int(blocks["out"]), int(blocks["in"])
    r_exact = rearranged(exact, out_dim, in_dim)
    singular = torch.linalg.svdvals(r_exact)
    errors = {
        name: float(torch.linalg.matrix_norm(exact - approx) / torch.linalg.matrix_norm(exact))
        for name, approx in (("KFAC", kfac), ("KPSVD", kpsvd))
    }
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), constrained_layout=True)
    limit = float(exact.abs().max())
    ax = axes[0]
    ax.imshow(exact, cmap="RdBu_r", vmin=-limit, vmax=limit)
    for k in range(1, out_dim):
        ax.axhline(k * in_dim - 0.5, color="black", linewidth=0.8)
        ax.axvline(k * in_dim - 0.5, color="black", linewidth=0.8)
    ax.set_title(
        f"exact Fisher block F ({out_dim}·{in_dim} = {out_dim * in_dim} parameters):\n"
        f"{out_dim} x {out_dim} blocks F_oo' of size {in_dim} x {in_dim}",
        fontsize=10,
    )
    ax = axes[1]
    ax.imshow(r_exact, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    ax.set_title(
        f"R(F): row (o, o') holds block F_oo' flattened\n"
        f"({out_dim * out_dim} x {in_dim * in_dim}); G ⊗ A ↦ vec(G) vec(A)ᵀ, rank one",
        fontsize=10,
    )
    ax.set_xlabel("(i, i')")
    ax.set_ylabel("(o, o')")
    ax = axes[2]
    ax.bar(range(1, len(singular) + 1), (singular / singular[0]).tolist(), color="tab:blue")
    ax.set_yscale("log")
    ax.set_xlabel("k")
    ax.set_title(
        "singular values of R(F), relative to the first\n"
        f"error ‖F − C‖/‖F‖: KFAC {errors['KFAC']:.3f}, KPSVD (top pair) {errors['KPSVD']:.3f}",
        fontsize=10,
    )
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").partition("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    draw_layout(args.out / "layout.png")
    draw_rearrangement(args.out / "rearrangement.png")
    print(f"wrote {args.out / 'layout.png'} and {args.out / 'rearrangement.png'}")


if __name__ == "__main__":
    main()
