"""Reproduce the paper's comparisons end to end: a grid of runs, a results table and accuracy-vs-density figures.

``python -m er_lightning.reproduce STUDY`` runs a named study (``digits-ratios``, ``digits-methods``,
``cifar10-paper``, ``cifar100-paper``) as independent ``python cli.py fit`` runs of the shipped LightningCLI
configs, several at once, skipping finished runs and resuming interrupted ones from their ``last.ckpt``; then it
writes ``results.csv``, ``results.md`` (mean ± std per cell) and one figure per group into the study's folder.
``--print-commands`` prints the plain commands instead (for a cluster scheduler), ``--collect`` only rebuilds the
table and figures from the run folders.

Example:
    >>> from pathlib import Path
    >>> from er_lightning.reproduce import build_study, fit_args
    >>> study = build_study("digits-ratios", densities=[0.05], methods=["balanced"], seeds=[1])
    >>> " ".join(fit_args(study.runs[0], Path("out"))[:5])
    'fit --config configs/digits/static.yaml --seed_everything=1 --trainer.callbacks.init_args.density=0.05'
"""

from __future__ import annotations

from er_lightning.reproduce.results import (
    RunResult,
    collect,
    markdown_table,
    plot_group,
    read_run,
    write_outputs,
)
from er_lightning.reproduce.runner import StudyReport, fit_args, plan, print_commands, run_study
from er_lightning.reproduce.studies import STUDIES, RunSpec, Study, build_study

__all__ = [
    "STUDIES",
    "RunResult",
    "RunSpec",
    "Study",
    "StudyReport",
    "build_study",
    "collect",
    "fit_args",
    "markdown_table",
    "plan",
    "plot_group",
    "print_commands",
    "read_run",
    "run_study",
    "write_outputs",
]
