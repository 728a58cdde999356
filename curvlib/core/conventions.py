r"""The conventions every layer of curvlib shares, written down once.

All other modules link here instead of restating them.

## Vectorisation and the bias column

A curvature layer (``Linear``, ``Conv2d``, ``ConvTranspose2d``) acts on its
(unfolded) input as a matrix $W \in \mathbb{R}^{d_\text{out} \times d_\text{in}}$:

* ``Linear``: ``weight`` as stored, shape ``(out, in)``.
* ``Conv2d``: ``weight.reshape(C_out, C_in * kh * kw)``, acting on the columns of
  ``torch.nn.functional.unfold`` of the input (one column per output position).
* ``ConvTranspose2d``: torch stores the kernel as ``(C_in, C_out, kh, kw)``; the
  matrix is ``weight.transpose(0, 1).reshape(C_out, C_in * kh * kw)``, acting on
  the transposed-convolution unfolding of the input (channel axes swapped, never
  a plain reshape of the stored kernel).

When the layer has a trainable bias it is appended as the last column,
$\bar W = [W \mid b] \in \mathbb{R}^{d_\text{out} \times (d_\text{in} + 1)}$, and
inputs get a trailing one (homogeneous coordinate), $\bar a = [a; 1]$, so the
layer computes $z = \bar W \bar a$. Parameters are vectorised row-major
(torch's ``flatten`` of $\bar W$), so that
$\operatorname{vec}(\bar W) = \operatorname{vec}_\text{row}(\bar W)$ and a
Kronecker-factored block reads $G \otimes A$ with $G$ of size
$d_\text{out}$ and $A$ of size $d_\text{in} + 1$:

$$(G \otimes A)\operatorname{vec}(V) = \operatorname{vec}(G V A), \qquad
(G \otimes A)^{-1}\operatorname{vec}(V) = \operatorname{vec}(G^{-1} V A^{-1}).$$

## Scaling of the statistics

Let $\ell_n$ be the loss *as written for one sample*: the loss module's
reduction applied to sample $n$ alone. For ``reduction="mean"`` torch's
``MSELoss``, ``BCEWithLogitsLoss`` and ``BCELoss`` divide by all output entries, so
$\ell_n$ keeps the factor $1/D$ of the $D$ entries of one sample
(``CrossEntropyLoss`` divides by the $D$ positions of a sample with spatial
dimensions). The batch loss is then $L = \frac1N \sum_n \ell_n$ for ``mean``
and $L = \sum_n \ell_n$ for ``sum``.

All statistics estimate the per-sample average

$$F = \frac1N \sum_{n=1}^N J_n^\top H_n J_n ,$$

with $J_n$ the Jacobian of the network output for sample $n$ and
$H_n$ the Hessian of $\ell_n$ with respect to that output ($2I/D$ for
``MSELoss`` with ``mean``, $\operatorname{diag}(p(1-p))/D$ for
``BCEWithLogitsLoss``, $(\operatorname{diag}(p) - pp^\top)/D$ for
``CrossEntropyLoss``; for ``BCELoss`` on probabilities $p$, whose Hessian
depends on the target, its expectation under the model, the Fisher
$\operatorname{diag}(1/(p(1-p)))/D$, see
``curvlib.extract.losses``). So ``mean`` and ``sum`` give the same statistics, up to
the $1/D$ that a ``mean`` keeps. Every flavour
([`FisherType`][curvlib.core.stats.FisherType]) writes $H_n = \sum_k s_{nk}
s_{nk}^\top$ and backpropagates the columns $s_{nk}$:

* ``EXACT``: $s_{nk}$ are the columns of a symmetric factorisation of $H_n$
  ($K$ = number of outputs per sample).
* ``MC``: $K$ Monte-Carlo samples, $s_{nk} = \frac{1}{\sqrt K}\, \varepsilon_{nk}$
  with $\mathbb{E}[\varepsilon \varepsilon^\top] = H_n$ (targets sampled from the
  model's predictive distribution), an unbiased estimate of ``EXACT``.
* ``EMPIRICAL``: $K = 1$, $s_n = \nabla_{f} \ell_n$ with the data targets: the
  empirical Fisher $\frac1N\sum_n \nabla \ell_n \nabla \ell_n^\top$ (which, with
  a ``mean`` over $D$ entries, carries $1/D^2$).

The *gradient* that the optimizer preconditions is the one autograd produces
for the batch loss as the user wrote it; for a ``mean`` reduction it is
$\frac1N\sum_n \nabla \ell_n$, consistent with $F$ above.

## Per-sample quantities and Kronecker factors

For sample $n$, output position $t$ (one position for ``Linear`` without extra
dimensions) and backpropagated column $k$, the extractor sees the layer input
$\bar a_{nt}$ and the output gradient $g_{knt} = J_{z_{nt}}^\top s_{nk}$. The
per-sample gradient matrix is $\bar W_{kn} = \sum_t g_{knt}\bar a_{nt}^\top$ and
the exact layer block is
$F_\text{layer} = \frac1N\sum_{k,n}\operatorname{vec}(\bar W_{kn})
\operatorname{vec}(\bar W_{kn})^\top$.

The Kronecker factors follow KFC (Grosse & Martens 2016; "KFAC-expand" in
Eschenhagen et al. 2023): $A$ sums the per-position outer products of the
inputs, $G$ averages those of the output gradients,

$$A = \frac1N \sum_n \sum_t \bar a_{nt}\bar a_{nt}^\top, \qquad
G = \frac1N \sum_{k,n} \frac1T \sum_t g_{knt} g_{knt}^\top ,$$

so that $G \otimes A = F_\text{layer}$ exactly whenever the batch holds one
sample and the layer has one output position.

## Coupled samples (``BatchNorm`` in train mode)

Batch statistics make every output $f_n$ depend on the layer outputs $z_{mt}$
of all samples $m$, so per-sample gradients do not exist and only Kronecker
factors are defined. Each column $s_{nk}$ is pulled back through the whole
batch and every row it reaches counts:

$$G = \frac{1}{NT}\sum_{k,n}\sum_{m,t} g_{kn,mt} g_{kn,mt}^\top, \qquad
g_{kn,mt} = J_{n,mt}^\top s_{nk}, \quad J_{n,mt} = \partial f_n/\partial z_{mt},$$

with $A$ averaged over all rows. ``MC`` columns are zero-mean draws and are
pulled back for all samples at once (cross-sample terms vanish in
expectation); ``EXACT`` pulls back every (sample, column) pair on its own;
``EMPIRICAL`` uses the output gradients of the user's backward of the batch
loss (times $N$ for ``mean``), cross-sample terms included, and always the
whole batch.
"""
