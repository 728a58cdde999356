"""The table of ``README.md`` from the ``screen*.txt`` outputs of ``screen.py``.

Tuned Adam's final losses first, then per setting and task: epochs to tuned Adam's
final loss as a fraction of Adam's epochs (``—``: not reached in the budget), final
losses, and the runs that diverged, seed 0 / 1 / 2. A setting screened on fewer
seeds shows fewer entries.

    python summarize.py
"""

from collections import defaultdict
from pathlib import Path

TASKS = ("curves", "digits-ae", "digits-mlp", "digits-cnn", "digits-convae")
rows: dict[str, dict[str, dict[int, tuple[str, str, bool]]]] = defaultdict(
    lambda: defaultdict(dict)
)
targets: dict[str, dict[int, str]] = defaultdict(dict)
for path in sorted(Path(__file__).parent.glob("screen*.txt")):
    for line in path.read_text().splitlines():
        label, _, rest = line.partition(" ")
        if label == "warmup":  # "warmup 3e-3 task ..." has a space in its label
            value, _, rest = rest.partition(" ")
            label = f"warmup {value}"
        parts = rest.split()
        if parts[0] == "clip":  # "3e-3 clip 1e-2 task ..."
            label, parts = f"{label} clip {parts[1]}", parts[2:]
        task, seed = parts[0], int(parts[1])
        fields = dict(zip(parts[2::2], parts[3::2], strict=False))
        targets[task][seed] = fields["target"]
        ep = "—" if fields["ep"] == "None" else fields["ep"]
        rows[label][task][seed] = (ep, fields["final"], fields["div"] == "True")

print("| damping | " + " | ".join(TASKS) + " |")
print("|---" * (len(TASKS) + 1) + "|")
adam = [" / ".join(f"{float(targets[t][s]):.4g}" for s in sorted(targets[t])) for t in TASKS]
print("| tuned Adam's final loss (the target) | " + " | ".join(adam) + " |")
for label, tasks in rows.items():
    cells = []
    for task in TASKS:
        runs = [tasks[task][s] for s in sorted(tasks[task])]
        if not runs:
            cells.append("")
            continue
        eps = " / ".join(r[0] for r in runs)
        finals = " / ".join(f"{float(r[1]):.4g}" for r in runs)
        div = sum(r[2] for r in runs)
        cells.append(f"{eps} ({finals})" + (f", {div} diverged" if div else ""))
    print(f"| {label} | " + " | ".join(cells) + " |")
