r"""The leading singular triples of $\mathcal R(F)$: power iterations and restarted Lanczos.

Both run on [`Coordinates`][curvlib.linalg.Coordinates] (a matrix-free
operator is flattened first) and return
[`SingularTriple`][curvlib.linalg.SingularTriple]s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from curvlib.linalg.rearrange.fisher import RearrangedOperator, effective_tol
from curvlib.linalg.rearrange.spaces import Coordinates, coordinates
from curvlib.linalg.rearrange.triples import SingularTriple

_BREAKDOWN = 1e3
"""Round-off level, in machine epsilons times the operator's size (breakdowns, zero pairs)."""


def power_svd(
    op: RearrangedOperator | Coordinates,
    v0: Tensor | None = None,
    u0: Tensor | None = None,
    *,
    tol: float = 1e-6,
    max_iter: int = 100,
    scale: float = 0.0,
    device_norms: bool | None = None,
) -> SingularTriple:
    r"""The top singular triple by power iterations on $\mathcal R^\top\mathcal R$.

    Each iteration computes $u = \mathcal R v / \|\mathcal R v\|$,
    $w = \mathcal R^\top u$, and stops once $\|w - \langle u, \mathcal R v\rangle
    v\|_F \le \text{tol}\, \|w\|_F$ (the sine of the angle between $v$ and its
    image). The error shrinks by $(\sigma_2/\sigma_1)^2$ per iteration, so a warm
    start from the previous step's factor saves most of them. An iteration
    costs one product with $\mathcal R$ and one with $\mathcal R^\top$: the
    norms come from the images of the iterates through the Gram matrices
    (``metric_in``, ``metric_out``), which in the sample-space form are those
    products themselves.

    Args:
        op: The operator, matrix-free or on coordinates
            ([`Coordinates`][curvlib.linalg.Coordinates]).
        v0: Warm start on the input side (``[in, in]``; need not be normalised).
        u0: Warm start on the output side, used when ``v0`` is missing.
        tol: Relative residual at which to stop (raised to
            [`effective_tol`][curvlib.linalg.effective_tol] of the
            operator's dtype: a smaller one is below round-off).
        max_iter: Cap on the iterations.
        scale: Size of the operator that ``op`` was deflated from (e.g. its
            $\sigma_1$): a singular value at round-off level of it,
            $\|\mathcal R v\| \le 10^3 \epsilon \cdot$ ``scale``, counts as zero.
        device_norms: Keep an iteration's three norms on the device and read
            them in one transfer at its end (one host read per iteration instead
            of three: on a GPU each read waits for the device). ``None`` (the
            default): where the operator is not on the CPU; on the CPU the norms
            are read as they are needed, as before, so results there keep their
            bits.

    Returns:
        The triple; ``sigma = 0`` with zero matrices when $\mathcal R v$ is zero
        (or at round-off level of ``scale``).

    Raises:
        ValueError: If ``max_iter < 1``.
    """
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter!r}.")
    space = coordinates(op)
    tol = effective_tol(tol, space.dtype)
    tiny = _BREAKDOWN * torch.finfo(space.dtype).eps * scale
    v = space.start(v0, u0)
    metric = space.metric_in(v)
    size = _norm(v, metric)
    if not size > 0:
        return _zero_triples(1, space, 1)[0]
    v, metric = v / size, metric / size
    u, sigma, residual = v, 0.0, math.inf
    best, stalled = math.inf, 0
    on_device = space.device.type != "cpu" if device_norms is None else device_norms
    for iteration in range(1, max_iter + 1):
        image = space.matvec(v, metric)
        image_metric = space.metric_out(image)
        if on_device:  # NaN or Inf where a norm is zero: refused below, after the read
            a = _device_norm(image, image_metric)
            u = image / a
            w = space.rmatvec(u, image_metric / a)
            w_metric = space.metric_in(w)
            b = _device_norm(w, w_metric)
            r = _device_norm(w - a * v, w_metric - a * metric) / b
            alpha, beta, residual = torch.stack([a, b, r]).tolist()
            if not (alpha > tiny and beta > tiny):
                return _zero_triples(1, space, iteration)[0]
            v, metric, sigma = w / b, w_metric / b, beta
        else:
            alpha = _norm(image, image_metric)
            if not alpha > tiny:
                return _zero_triples(1, space, iteration)[0]
            u = image / alpha
            w = space.rmatvec(u, image_metric / alpha)
            w_metric = space.metric_in(w)
            beta = _norm(w, w_metric)
            if not beta > tiny:  # beta >= alpha in exact arithmetic: a breakdown at round-off
                return _zero_triples(1, space, iteration)[0]
            residual = _norm(w - alpha * v, w_metric - alpha * metric) / beta
            v, metric, sigma = w / beta, w_metric / beta, beta
        if residual <= tol:
            break
        best, stalled = (residual, 0) if residual < best else (best, stalled + 1)
        if space.stall_window is not None and stalled >= space.stall_window:
            break
    U, V = space.out_matrix(u), space.in_matrix(v)
    return SingularTriple(sigma, U, V, iteration, residual, u, v)


def _norm(x: Tensor, metric: Tensor) -> float:
    """The norm of coordinates ``x`` from their image ``metric`` through the Gram matrix."""
    return math.sqrt(max(float(x @ metric), 0.0))


def _device_norm(x: Tensor, metric: Tensor) -> Tensor:
    """``_norm`` as a 0-dimensional tensor, unread (in the working dtype)."""
    return torch.sqrt(torch.clamp_min(x @ metric, 0.0))


def _orthogonalise(
    w: Tensor, metric: Tensor, basis: list[Tensor], images: list[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Remove the components along an orthonormal basis (Gram–Schmidt twice).

    ``metric`` is ``w``'s image through the Gram matrix and ``images`` those of
    the basis vectors: the inner products and the new vector's image follow
    without a product. Returns the new vector, its image and the coefficients.
    """
    if not basis:
        return w, metric, w.new_zeros(0)
    Q, QM = torch.stack(basis), torch.stack(images)
    coef = Q @ metric
    w, metric = w - coef @ Q, metric - coef @ QM
    again = Q @ metric
    return w - again @ Q, metric - again @ QM, coef + again


def lanczos_svd(
    op: RearrangedOperator | Coordinates,
    rank: int = 2,
    v0: Tensor | None = None,
    *,
    krylov_dim: int = 10,
    tol: float = 1e-6,
    max_restarts: int = 20,
    device_norms: bool | None = None,
) -> tuple[SingularTriple, ...]:
    r"""The top ``rank`` singular triples by restarted Golub–Kahan–Lanczos bidiagonalisation.

    Builds orthonormal $V_k$, $U_k$ with $\mathcal R V_k = U_k B_k$ and
    $\mathcal R^\top U_k = V_k B_k^\top + \beta_k v_{k+1} e_k^\top$ (full
    reorthogonalisation), takes the Ritz triples from the SVD $B_k = X \Sigma
    Y^\top$ and stops once every wanted residual $\beta_k |X_{ki}| \le
    \text{tol}\,\sigma_1$. Otherwise it thick-restarts (Baglama & Reichel 2005)
    from the ``rank + 1`` leading Ritz vectors and $v_{k+1}$. A breakdown
    ($\alpha_j$ or $\beta_j$ at round-off level) means an invariant subspace was
    found and the triples are exact: with rank$(\mathcal R) \le$ ``rank`` the
    result is the exact rearranged block. Cost per restart: ``krylov_dim``
    products with $\mathcal R$ and $\mathcal R^\top$ and the reorthogonalisation,
    $O(k^2 (d_o^2 + d_i^2))$ matrix-free, $O(k^2 N)$ plus $2k$ Gram products in
    the sample-space form: the images of the basis vectors through the Gram
    matrices are kept, so inner products and norms need no product.

    Args:
        op: The operator, matrix-free or on coordinates
            ([`Coordinates`][curvlib.linalg.Coordinates]).
        rank: How many triples.
        v0: Start on the input side (``[in, in]``, e.g. a sum of the previous
            factors); the operator's own start when missing or zero (the cold
            start of [`power_svd`][curvlib.linalg.power_svd] for a
            matrix-free one).
        krylov_dim: Largest Krylov dimension $k$ before a restart.
        tol: Relative residual at which to stop (raised to
            [`effective_tol`][curvlib.linalg.effective_tol] of the
            operator's dtype).
        max_restarts: Cap on the restarts.
        device_norms: Run each sweep of the bidiagonalisation with its norms
            on the device and read them in one transfer at its end, where the
            breakdown tests are made in their order and the sweep is cut at the
            first breakdown (the steps after it are discarded, and counted in
            ``iterations``): one host read per sweep instead of three per step.
            ``None`` (the default): where the operator is not on the CPU; on
            the CPU the norms are read as they are needed, as before.

    Returns:
        ``rank`` triples by decreasing $\sigma$; missing ones (rank$(\mathcal R) <$
        ``rank``) have $\sigma = 0$ and zero matrices. ``iterations`` counts all
        products of the call.

    Raises:
        ValueError: If ``krylov_dim < rank + 2``.
    """
    if krylov_dim < rank + 2:
        raise ValueError(f"krylov_dim must be at least rank + 2 = {rank + 2}, got {krylov_dim}.")
    space = coordinates(op)
    tol = effective_tol(tol, space.dtype)
    first = space.start(v0, None)
    first_metric = space.metric_in(first)
    size = _norm(first, first_metric)
    if not size > 0:
        return _zero_triples(rank, space, 0)
    Vs, MVs = [first / size], [first_metric / size]  # and their images (``metric_in``)
    like = Vs[0]
    bd = _Bidiagonal(
        space, like.new_zeros(krylov_dim, krylov_dim), [], [], Vs, MVs, krylov_dim,
        _BREAKDOWN * torch.finfo(space.dtype).eps,
    )  # fmt: skip
    sweep = _device_sweep if (
        space.device.type != "cpu" if device_norms is None else device_norms
    ) else _host_sweep  # fmt: skip
    for restart in range(max_restarts + 1):
        broke, beta = sweep(bd)
        Us, MUs, Vs, MVs, B, products = bd.Us, bd.MUs, bd.Vs, bd.MVs, bd.B, bd.products
        m = len(Us)
        if m == 0:
            break
        U_basis = torch.stack(Us)
        k = m + 1 if broke == "alpha" else m
        V_basis = torch.stack(Vs[:k])
        X, s, Yt = torch.linalg.svd(B[:m, :k], full_matrices=False)
        left, right = X.T @ U_basis, Yt @ V_basis  # Ritz vectors, as rows
        residuals = [0.0] * m if broke else (beta * X[-1].abs() / s[0]).tolist()
        if broke or restart == max_restarts or max(residuals[:rank]) <= tol:
            triples = tuple(
                SingularTriple(
                    float(s[i]),
                    space.out_matrix(left[i]),
                    space.in_matrix(right[i]),
                    products,
                    residuals[i],
                    left[i],
                    right[i],
                )
                for i in range(min(rank, m))
            )
            return triples + _zero_triples(rank - len(triples), space, products)
        # Thick restart: keep the leading Ritz pairs and the residual direction v_{k+1}.
        keep = min(rank + 1, m - 1)
        left_metric, right_metric = X.T @ torch.stack(MUs), Yt @ torch.stack(MVs[:k])
        bd.Us, bd.MUs = list(left[:keep]), list(left_metric[:keep])
        bd.Vs, bd.MVs = [*right[:keep], Vs[-1]], [*right_metric[:keep], MVs[-1]]
        bd.B = like.new_zeros(krylov_dim, krylov_dim)
        bd.B[:keep, :keep] = torch.diag(s[:keep])
    return _zero_triples(rank, space, bd.products)


@dataclass
class _Bidiagonal:
    """What ``lanczos_svd``'s sweeps extend in place: the bases, their images and $B$.

    ``Us``, ``Vs`` are the orthonormal bases (``Vs`` one longer after a full
    sweep: the residual direction), ``MUs``, ``MVs`` their images through the
    Gram matrices; ``scale`` is the running size of the breakdown test,
    ``products`` the products with the operator so far.
    """

    space: Coordinates
    B: Tensor
    Us: list[Tensor]
    MUs: list[Tensor]
    Vs: list[Tensor]
    MVs: list[Tensor]
    krylov_dim: int
    tiny: float
    scale: float = 0.0
    products: int = 0


def _host_sweep(bd: _Bidiagonal) -> tuple[str, float]:
    r"""One sweep of ``lanczos_svd``, its norms read as they are needed.

    Up to ``krylov_dim`` steps or the first breakdown.

    Returns:
        ``(broke, beta)``: ``"alpha"``, ``"beta"`` or ``""``, and the last $\beta$.
    """
    space, B, Us, MUs, Vs, MVs = bd.space, bd.B, bd.Us, bd.MUs, bd.Vs, bd.MVs
    broke, beta = "", 0.0
    for j in range(len(Us), bd.krylov_dim):
        image = space.matvec(Vs[j], MVs[j])
        w, w_metric, coef = _orthogonalise(image, space.metric_out(image), Us, MUs)
        bd.products += 1
        B[:j, j] = coef
        alpha = _norm(w, w_metric)
        bd.scale = max(bd.scale, alpha, float(coef.abs().max()) if j else 0.0)
        if alpha <= bd.tiny * bd.scale:
            broke = "alpha"
            break
        B[j, j] = alpha
        Us.append(w / alpha)
        MUs.append(w_metric / alpha)
        image = space.rmatvec(Us[j], MUs[j])
        f, f_metric, _ = _orthogonalise(image, space.metric_in(image), Vs, MVs)
        beta = _norm(f, f_metric)
        if beta <= bd.tiny * bd.scale:
            broke = "beta"
            break
        Vs.append(f / beta)  # after the last step: the residual direction v_{k+1}
        MVs.append(f_metric / beta)
    return broke, beta


def _device_sweep(bd: _Bidiagonal) -> tuple[str, float]:
    """One sweep of ``lanczos_svd`` with its norms read once, at the end (``device_norms``).

    Leaves ``bd`` as ``_host_sweep`` would, up to its first breakdown, which is
    found afterwards from the read norms, in order; what was computed after it
    is dropped (its products are counted).
    """
    space, B, Us, MUs, Vs, MVs = bd.space, bd.B, bd.Us, bd.MUs, bd.Vs, bd.MVs
    start = len(Us)
    norms: list[Tensor] = []  # per step: alpha, the largest |coef|, beta
    zero = B.new_zeros(())
    for j in range(start, bd.krylov_dim):
        image = space.matvec(Vs[j], MVs[j])
        w, w_metric, coef = _orthogonalise(image, space.metric_out(image), Us, MUs)
        bd.products += 1
        B[:j, j] = coef
        alpha = _device_norm(w, w_metric)
        B[j, j] = alpha
        Us.append(w / alpha)
        MUs.append(w_metric / alpha)
        image = space.rmatvec(Us[j], MUs[j])
        f, f_metric, _ = _orthogonalise(image, space.metric_in(image), Vs, MVs)
        beta = _device_norm(f, f_metric)
        Vs.append(f / beta)
        MVs.append(f_metric / beta)
        norms += [alpha, coef.abs().max() if j else zero, beta]
    values = torch.stack(norms).tolist() if norms else []
    broke, beta_value = "", 0.0
    for step, j in enumerate(range(start, bd.krylov_dim)):
        alpha_value, largest, beta_value = values[3 * step : 3 * step + 3]
        bd.scale = max(bd.scale, alpha_value, largest)
        if alpha_value <= bd.tiny * bd.scale:  # as the host path: u_j and v_{j+1} never made
            broke = "alpha"
            del Us[j:], MUs[j:], Vs[j + 1 :], MVs[j + 1 :]
            break
        if beta_value <= bd.tiny * bd.scale:  # v_{j+1} never made
            broke = "beta"
            del Us[j + 1 :], MUs[j + 1 :], Vs[j + 1 :], MVs[j + 1 :]
            break
    return broke, beta_value


def _zero_triples(count: int, space: Coordinates, iterations: int) -> tuple[SingularTriple, ...]:
    dtype, device = space.dtype, space.device
    zero_u = torch.zeros(space.out_dim, space.out_dim, dtype=dtype, device=device)
    zero_v = torch.zeros(space.in_dim, space.in_dim, dtype=dtype, device=device)
    return tuple(SingularTriple(0.0, zero_u, zero_v, iterations, 0.0) for _ in range(count))
