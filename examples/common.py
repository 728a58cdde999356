"""One import for curvlib's example scripts: command line, optimizers, training, reports.

The pieces live in small modules, each with one job:

* ``cli``: the common flags (``build_parser``), their types and checks;
* ``optimizers``: ``OPTIMIZERS``, the one dict from ``--optim`` name to factory;
* ``training``: the training loop (``run_experiment``), checkpoints, telemetry;
* ``report``: metrics files, plots and the comparison summary;
* ``torchrun``: data-parallel training under ``torchrun`` (process group, each
  rank's part of the batch, rank 0 alone writing and printing).

Every example builds its parser with ``build_parser``, turns the ``--optim``
string into an optimizer through ``OPTIMIZERS`` and trains with
``run_experiment``, which writes per-epoch metrics (``metrics.csv``,
``metrics.json``), a loss plot (``loss.png``), the telemetry plot of curvlib
optimizers (``telemetry.png``) and a checkpoint (``checkpoint.pt``) to ``--out``
after every epoch; ``--resume`` continues from that checkpoint and ``--compare``
runs several optimizers on the same data and seed (one subdirectory each, a
combined ``compare.png`` and a printed summary table); ``--grid`` runs ``--optim``
at every combination of a few hyper-parameter values (one subdirectory each,
``grid.csv`` and ``grid.png`` with the best run marked).

Common flags: ``--preset --optim --lr --damping --adaptive-damping --clipping
--kl-clip-lr-squared --momentum --weight-decay --decoupled-weight-decay
--damping-mode --conv-damping --decay --fisher --stats-fraction --t-cov --t-inv
--warmup --refresh-on-move --max-move --overlap-inverse --split-inverses --compare --grid
--batch-size --num-epochs --num-train --num-test --data-root --device --threads --seed
--out --resume --no-progress --patience --patience-metric``. ``--preset paper`` sets
the defaults of the KPSVD papers' configuration (``PRESETS``); explicit flags override
it.
"""

from __future__ import annotations

from cli import (
    DEVICE_CHOICES,
    FISHER_CHOICES,
    GRID_PARAMETERS,
    PRESETS,
    GridAxis,
    RunSpec,
    UsageError,
    build_parser,
    fraction,
    grid_axis,
    grid_specs,
    momentum_float,
    nonnegative_float,
    optim_config,
    positive_float,
    positive_int,
    resolve_device,
    run_spec,
    run_spec_list,
    runs_of,
    several_runs,
)
from optimizers import (
    DEFAULT_CURVATURE_LR,
    OPTIMIZERS,
    Factory,
    OptimConfig,
    OptimizerSpec,
    build_optimizer,
)
from report import (
    GRID_FIELDS,
    RunResult,
    best_adam,
    best_run,
    grid_rows,
    grid_table,
    plot_runs,
    plot_telemetry,
    summarize,
    time_to_reach,
    write_grid,
    write_metrics,
    write_summary,
)
from torchrun import log, main_process
from training import (
    CHECKPOINT,
    METRIC_FIELDS,
    TELEMETRY_FIELDS,
    TIMINGS,
    EarlyStopping,
    Task,
    Telemetry,
    evaluate,
    run_experiment,
    save_checkpoint,
    step_optimizer,
    train_one,
)

__all__ = [
    "CHECKPOINT",
    "DEFAULT_CURVATURE_LR",
    "DEVICE_CHOICES",
    "FISHER_CHOICES",
    "GRID_FIELDS",
    "GRID_PARAMETERS",
    "METRIC_FIELDS",
    "OPTIMIZERS",
    "PRESETS",
    "TELEMETRY_FIELDS",
    "TIMINGS",
    "EarlyStopping",
    "Factory",
    "GridAxis",
    "OptimConfig",
    "OptimizerSpec",
    "RunResult",
    "RunSpec",
    "Task",
    "Telemetry",
    "UsageError",
    "best_adam",
    "best_run",
    "build_optimizer",
    "build_parser",
    "evaluate",
    "fraction",
    "grid_axis",
    "grid_rows",
    "grid_specs",
    "grid_table",
    "log",
    "main_process",
    "momentum_float",
    "nonnegative_float",
    "optim_config",
    "plot_runs",
    "plot_telemetry",
    "positive_float",
    "positive_int",
    "resolve_device",
    "run_experiment",
    "run_spec",
    "run_spec_list",
    "runs_of",
    "save_checkpoint",
    "several_runs",
    "step_optimizer",
    "summarize",
    "time_to_reach",
    "train_one",
    "write_grid",
    "write_metrics",
    "write_summary",
]
