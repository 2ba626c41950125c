"""Read finished runs from their TensorBoard logs and write a study's CSV, markdown table and figures.

Everything is read from the run folders (``runs/<run_id>/logs``: TensorBoard events and the ``config.yaml``
LightningCLI saves), so ``--collect`` works on runs that ran anywhere, e.g. on a cluster from
``--print-commands``, once their folders are copied into the study folder.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from er_lightning.reproduce.studies import RunSpec, Study

__all__ = [
    "CSV_FIELDS",
    "Cell",
    "Row",
    "RunResult",
    "aggregate",
    "collect",
    "markdown_table",
    "plot_group",
    "read_run",
    "write_outputs",
]

#: TensorBoard tags read from every run.
ACC_TAG = "val/acc"
DENSITY_TAG = "sparsity/density_global"
#: Columns of ``results.csv``, one row per run.
CSV_FIELDS: tuple[str, ...] = (
    "study",
    "group",
    "method",
    "density",
    "seed",
    "run_id",
    "status",
    "epochs_done",
    "max_epochs",
    "acc_final",
    "acc_best",
    "density_final",
    "wall_s",
)


@dataclass(frozen=True)
class RunResult:
    """What a run's logs say.

    Args:
        epochs_done: one more than the last epoch with a logged ``val/acc`` (0-based epoch + 1).
        max_epochs: ``trainer.max_epochs`` of the run's saved config (``None`` when not set).
        acc_final: ``val/acc`` of the last logged epoch (the studies validate on the test split).
        acc_best: the largest ``val/acc`` over all epochs (upstream's reported number; optimistic).
        density_final: the last logged ``sparsity/density_global`` (``None`` if never logged).
        wall_s: seconds between the first and the last event (includes time spent killed between resumes).

    Example:
        >>> RunResult(epochs_done=10, max_epochs=10, acc_final=0.97, acc_best=0.98, density_final=0.1, wall_s=9.5).finished
        True
    """

    epochs_done: int
    max_epochs: int | None
    acc_final: float | None
    acc_best: float | None
    density_final: float | None
    wall_s: float | None

    @property
    def finished(self) -> bool:
        """True when the last epoch of ``max_epochs`` has its validation accuracy logged.

        Only the last epoch is required: a run killed between TensorBoard flushes may lack the events of some
        earlier epochs, which resuming from ``last.ckpt`` does not repeat.
        """
        return self.max_epochs is not None and self.max_epochs > 0 and self.epochs_done >= self.max_epochs


def _scalars(log_dir: Path) -> dict[str, list[tuple[float, int, float]]]:
    """``{tag: [(wall_time, step, value), ...]}`` of every event file in ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _max_epochs(log_dir: Path) -> int | None:
    config_file = log_dir / "config.yaml"
    if not config_file.is_file():
        return None
    config: Any = yaml.safe_load(config_file.read_text())
    value = (config or {}).get("trainer", {}).get("max_epochs")
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None


def read_run(run_dir: Path) -> RunResult | None:
    """Read one run's ``logs/`` folder; ``None`` when it has no logs yet.

    The validation accuracy of each epoch is taken from the ``val/acc`` events; the epoch of an event is the
    ``epoch`` scalar Lightning logs at the same step. When a run was killed after validating an epoch and resumed
    from the checkpoint before it, that epoch is logged twice: the later event (by wall time) counts.

    Args:
        run_dir: the run's folder (``<study>/runs/<run_id>``).

    Returns:
        The :class:`RunResult`, or ``None`` when ``run_dir/logs`` does not exist or holds no events.
    """
    log_dir = run_dir / "logs"
    if not log_dir.is_dir() or not any(log_dir.glob("events.out.tfevents.*")):
        return None
    scalars = _scalars(log_dir)
    epoch_at_step: dict[int, float] = {}
    for _, step, value in scalars.get("epoch", []):
        epoch_at_step[step] = max(value, epoch_at_step.get(step, value))
    per_epoch: dict[int, tuple[float, float]] = {}  # epoch -> (wall_time, acc)
    for wall, step, value in scalars.get(ACC_TAG, []):
        if step not in epoch_at_step:
            continue
        epoch = int(epoch_at_step[step])
        if epoch not in per_epoch or wall >= per_epoch[epoch][0]:
            per_epoch[epoch] = (wall, value)
    accs = [per_epoch[e][1] for e in sorted(per_epoch)]
    densities = sorted(scalars.get(DENSITY_TAG, []))
    walls = [w for series in scalars.values() for w, _, _ in series]
    return RunResult(
        epochs_done=max(per_epoch) + 1 if per_epoch else 0,
        max_epochs=_max_epochs(log_dir),
        acc_final=accs[-1] if accs else None,
        acc_best=max(accs) if accs else None,
        density_final=densities[-1][2] if densities else None,
        wall_s=(max(walls) - min(walls)) if walls else None,
    )


@dataclass(frozen=True)
class Row:
    """One run of a study with what its logs say (``result`` is ``None`` for a run not started).

    Example:
        >>> from er_lightning.reproduce.studies import RunSpec
        >>> Row(RunSpec("g", "erk", 0.1, 0, ("configs/digits/static.yaml",)), None).status
        'missing'
    """

    spec: RunSpec
    result: RunResult | None

    @property
    def status(self) -> str:
        """``finished``, ``partial`` (logs but not every epoch) or ``missing`` (no logs)."""
        if self.result is None:
            return "missing"
        return "finished" if self.result.finished else "partial"


def collect(study: Study, study_dir: Path) -> list[Row]:
    """Read every run of ``study`` under ``study_dir/runs``, in the study's order."""
    return [Row(spec, read_run(study_dir / "runs" / spec.run_id)) for spec in study.runs]


@dataclass(frozen=True)
class Cell:
    """Final accuracies of the finished seeds of one (group, method, density).

    Example:
        >>> cell = Cell((0.90, 0.95))
        >>> round(cell.mean, 4), round(cell.std, 4)
        (0.925, 0.0354)
    """

    values: tuple[float, ...]

    @property
    def n(self) -> int:
        """Number of finished seeds."""
        return len(self.values)

    @property
    def mean(self) -> float:
        """Mean final accuracy (fraction)."""
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        """Sample standard deviation (n - 1); 0 for a single seed."""
        return statistics.stdev(self.values) if self.n > 1 else 0.0


def aggregate(rows: Iterable[Row]) -> dict[tuple[str, str, float], Cell]:
    """``{(group, method, density): Cell}`` over finished runs only."""
    values: dict[tuple[str, str, float], list[float]] = {}
    for row in rows:
        if row.status == "finished" and row.result is not None and row.result.acc_final is not None:
            key = (row.spec.group, row.spec.method, row.spec.density)
            values.setdefault(key, []).append(row.result.acc_final)
    return {key: Cell(tuple(v)) for key, v in values.items()}


def _fmt_cell(cell: Cell | None, n_seeds: int, bold: bool) -> str:
    if cell is None:
        return "–"
    text = f"{100 * cell.mean:.2f} ± {100 * cell.std:.2f}" if cell.n > 1 else f"{100 * cell.mean:.2f}"
    if bold:
        text = f"**{text}**"
    return text if cell.n == n_seeds else f"{text} (n={cell.n})"


def _groups(study: Study) -> list[str]:
    return list(dict.fromkeys(spec.group for spec in study.runs))


def _densities(study: Study, group: str) -> list[float]:
    found = {s.density for s in study.runs if s.group == group and s.method != "dense"}
    return sorted(found, reverse=True)


def markdown_table(study: Study, rows: Sequence[Row]) -> str:
    """The study's results as markdown: one table per group, methods × densities, mean ± std in percent.

    Each cell is the mean ± sample standard deviation of the last-epoch test accuracy over the finished seeds,
    in percent with two decimals; ``(n=k)`` marks a cell with fewer seeds than planned, ``–`` one with none. The
    best mean of each density column is bold. The dense reference (density 1) follows each table.
    """
    cells = aggregate(rows)
    finished = sum(r.status == "finished" for r in rows)
    lines = [f"## {study.name}", "", study.description + ".", ""]
    lines += [*study.notes, "", f"Finished runs: {finished} of {len(rows)}.", ""]
    for group in _groups(study):
        specs = [s for s in study.runs if s.group == group]
        n_seeds = len({s.seed for s in specs})
        densities = _densities(study, group)
        methods = [m for m in study.methods if m != "dense" and any(s.method == m for s in specs)]
        epochs = sorted(
            {r.result.max_epochs for r in rows if r.spec.group == group and r.result and r.result.max_epochs}
        )
        seeds = f"{n_seeds} seed" + ("s" if n_seeds != 1 else "")
        lines += [f"### {group}", "", f"Test accuracy (%) of the last epoch, mean ± std over {seeds}"]
        lines[-1] += f" ({', '.join(map(str, epochs))} epochs per run)." if epochs else "."
        lines.append("")
        lines.append("| method | " + " | ".join(f"d = {d:g}" for d in densities) + " |")
        lines.append("|---|" + "---:|" * len(densities))
        best = {
            d: max((cells[(group, m, d)].mean for m in methods if (group, m, d) in cells), default=None)
            for d in densities
        }
        for m in methods:
            row_cells = []
            for d in densities:
                cell = cells.get((group, m, d))
                is_best = cell is not None and best[d] is not None and cell.mean == best[d]
                row_cells.append(_fmt_cell(cell, n_seeds, is_best))
            lines.append(f"| {m} | " + " | ".join(row_cells) + " |")
        if any(s.method == "dense" for s in specs):
            lines += [
                "",
                f"Dense (density 1): {_fmt_cell(cells.get((group, 'dense', 1.0)), n_seeds, False)}.",
            ]
        lines.append("")
    return "\n".join(lines)


def plot_group(study: Study, rows: Sequence[Row], group: str) -> Any:
    """Accuracy vs density for one group: one line per method (mean ± std error bars), log-scale density axis.

    The dense reference is a dashed horizontal line. Uses matplotlib's object-oriented API (no pyplot state).

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cells = aggregate(rows)
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    densities = _densities(study, group)
    for method in study.methods:
        if method == "dense":
            continue
        points = [(d, cells[(group, method, d)]) for d in sorted(densities) if (group, method, d) in cells]
        if not points:
            continue
        ax.errorbar(
            [d for d, _ in points],
            [100 * c.mean for _, c in points],
            yerr=[100 * c.std for _, c in points],
            marker="o",
            markersize=4,
            capsize=3,
            label=method,
        )
    dense = cells.get((group, "dense", 1.0))
    if dense is not None:
        ax.axhline(100 * dense.mean, color="black", linestyle="--", linewidth=1, label="dense")
    ax.set_xscale("log")
    if densities:
        ax.set_xticks(sorted(densities), [f"{d:g}" for d in sorted(densities)])
        ax.minorticks_off()
    ax.set_xlabel("density (fraction of weights kept, log scale)")
    ax.set_ylabel("test accuracy (%), last epoch")
    ax.set_title(f"{study.name}: {group}")
    ax.grid(True, alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        order = sorted(range(len(labels)), key=lambda i: study.methods.index(labels[i]))  # the study's order
        ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize="small")
    return fig


def write_outputs(study: Study, study_dir: Path, rows: Sequence[Row]) -> list[Path]:
    """Write ``results.csv``, ``results.md`` and one ``<group>.png`` per group into ``study_dir``.

    Returns:
        The written paths.
    """
    study_dir.mkdir(parents=True, exist_ok=True)
    csv_path = study_dir / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            r = row.result
            writer.writerow(
                {
                    "study": study.name,
                    "group": row.spec.group,
                    "method": row.spec.method,
                    "density": f"{row.spec.density:g}",
                    "seed": row.spec.seed,
                    "run_id": row.spec.run_id,
                    "status": row.status,
                    "epochs_done": "" if r is None else r.epochs_done,
                    "max_epochs": "" if r is None or r.max_epochs is None else r.max_epochs,
                    "acc_final": _num(None if r is None else r.acc_final),
                    "acc_best": _num(None if r is None else r.acc_best),
                    "density_final": _num(None if r is None else r.density_final),
                    "wall_s": _num(None if r is None else r.wall_s, 1),
                }
            )
    md_path = study_dir / "results.md"
    figures = [study_dir / f"{group}.png" for group in _groups(study)]
    table = markdown_table(study, rows)
    table += "\n" + "\n".join(f"![{p.stem}]({p.name})" for p in figures) + "\n"
    md_path.write_text(table)
    for group, path in zip(_groups(study), figures):
        plot_group(study, rows, group).savefig(path, dpi=120)
    return [csv_path, md_path, *figures]


def _num(value: float | None, digits: int = 6) -> str:
    if value is None or not math.isfinite(value):
        return ""
    return f"{value:.{digits}f}"
