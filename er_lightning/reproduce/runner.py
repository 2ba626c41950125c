"""Run a study: one ``python cli.py fit`` subprocess per run, several at once, resumable, with progress.

Each run writes into ``<study_dir>/runs/<run_id>/``:

* ``logs/``: TensorBoard events and the resolved ``config.yaml`` (the logger's ``save_dir``/``name``/``version``
  are set on the command line, so a resumed run appends to the same folder);
* ``checkpoints/last.ckpt``: the configs keep a resumable checkpoint after every epoch;
* ``command.json``: the run's arguments (without ``--ckpt_path``), to refuse resuming with different settings;
* ``fit.log``: the subprocess's output.

A run whose logs hold every epoch is skipped; one with a ``last.ckpt`` but not finished is resumed with
``--ckpt_path <run>/checkpoints/last.ckpt``; anything else starts from scratch.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from er_lightning.reproduce.results import Row, collect, read_run, write_outputs
from er_lightning.reproduce.studies import RunSpec, Study

__all__ = ["REPO_ROOT", "StudyReport", "fit_args", "plan", "print_commands", "run_study"]

log = logging.getLogger(__name__)

#: The repository checkout this package lives in (holds ``cli.py`` and ``configs/``).
REPO_ROOT = Path(__file__).resolve().parents[2]
GPU_FRAGMENT = "configs/trainer/gpu.yaml"


def _check_root(root: Path) -> None:
    if not (root / "cli.py").is_file() or not (root / "configs").is_dir():
        raise FileNotFoundError(
            f"{root} has no cli.py and configs/: the studies run the repository's configs, so run "
            "er_lightning.reproduce from a checkout of er-lightning (pip install -e .), or pass root=<checkout>"
        )


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it (commands run from the repository root), else absolute."""
    path = path.resolve()
    try:
        return str(path.relative_to(root.resolve()))
    except ValueError:
        return str(path)


def run_dir(study_dir: Path, spec: RunSpec) -> Path:
    """The folder of one run: ``<study_dir>/runs/<run_id>``."""
    return study_dir / "runs" / spec.run_id


def fit_args(
    spec: RunSpec,
    study_dir: Path,
    extra: Sequence[str] = (),
    *,
    root: Path = REPO_ROOT,
    resume_from: Path | None = None,
) -> list[str]:
    """The ``cli.py`` arguments of one run (``fit``, its configs, overrides, output folders, ``extra``).

    Args:
        spec: the run.
        study_dir: the study's folder; the run writes under ``study_dir/runs/<run_id>``.
        extra: arguments appended to every run (e.g. ``--trainer.max_epochs=3``); they win over the configs.
        root: repository root the command runs in (relative config paths).
        resume_from: a checkpoint to resume from (``--ckpt_path``).

    Returns:
        The argument list after ``python cli.py``.

    Example:
        >>> from er_lightning.reproduce.studies import build_study
        >>> spec = build_study("digits-ratios", densities=[0.1], methods=["erk"], seeds=[0]).runs[0]
        >>> fit_args(spec, Path("study"))[:3]
        ['fit', '--config', 'configs/digits/static.yaml']
    """
    args = ["fit"]
    for config in spec.configs:
        args += ["--config", config]
    if spec.accelerator == "gpu":
        args += ["--config", GPU_FRAGMENT]
    args += list(spec.overrides)
    runs = study_dir / "runs"
    args += [
        f"--trainer.logger.init_args.save_dir={_shown(runs, root)}",
        f"--trainer.logger.init_args.name={spec.run_id}",
        "--trainer.logger.init_args.version=logs",
        f"--checkpoint.dirpath={_shown(runs / spec.run_id / 'checkpoints', root)}",
    ]
    args += list(extra)
    if resume_from is not None:
        args.append(f"--ckpt_path={_shown(resume_from, root)}")
    return args


@dataclass(frozen=True)
class Planned:
    """A run and what to do with it: ``skip`` (finished), ``resume`` (from ``checkpoint``) or ``start``.

    ``args`` are the run's ``cli.py`` arguments (with ``--ckpt_path`` last when resuming); :func:`plan` makes them.
    """

    spec: RunSpec
    action: str
    checkpoint: Path | None
    args: list[str]


def plan(
    study: Study, study_dir: Path, extra: Sequence[str] = (), *, root: Path = REPO_ROOT
) -> list[Planned]:
    """Decide per run: skip a finished one, resume one with a ``last.ckpt``, start the rest.

    Raises:
        ValueError: a run folder whose ``command.json`` differs from the command this call would run (another
            grid or other ``extra`` arguments wrote it): mixing them would average different settings.
    """
    planned = []
    for spec in study.runs:
        folder = run_dir(study_dir, spec)
        base = fit_args(spec, study_dir, extra, root=root)
        recorded = folder / "command.json"
        if recorded.is_file():
            previous = json.loads(recorded.read_text())
            if previous != base:
                raise ValueError(
                    f"{folder} was run with other arguments:\n  {shlex.join(previous)}\nnow:\n  {shlex.join(base)}\n"
                    "Use another output folder (--out) for other settings, or delete that run folder to redo it."
                )
        result = read_run(folder)
        last = folder / "checkpoints" / "last.ckpt"
        if result is not None and result.finished:
            planned.append(Planned(spec, "skip", None, base))
        elif last.is_file():
            planned.append(
                Planned(spec, "resume", last, fit_args(spec, study_dir, extra, root=root, resume_from=last))
            )
        else:
            planned.append(Planned(spec, "start", None, base))
    return planned


def print_commands(
    study: Study,
    study_dir: Path,
    extra: Sequence[str] = (),
    *,
    root: Path = REPO_ROOT,
    python: str = "python",
) -> list[str]:
    """The plain ``python cli.py fit ...`` command of every run still to do, one line each (run from ``root``).

    Finished runs are left out; an interrupted run's command resumes from its ``last.ckpt``. Any scheduler can
    run the lines (a SLURM array indexing them, GNU parallel); ``--collect`` then reads the run folders.
    """
    _check_root(root)
    return [
        shlex.join([python, "cli.py", *p.args])
        for p in plan(study, study_dir, extra, root=root)
        if p.action != "skip"
    ]


@dataclass(frozen=True)
class StudyReport:
    """Outcome of :func:`run_study`: run ids per outcome and the written result files.

    Example:
        >>> report = StudyReport(skipped=("a",), finished=("b",), failed=(), outputs=())
        >>> len(report.skipped) + len(report.finished)
        2
    """

    skipped: tuple[str, ...]
    finished: tuple[str, ...]
    failed: tuple[str, ...]
    outputs: tuple[Path, ...]


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def _best(rows: Sequence[Row]) -> str:
    """The finished run with the highest final accuracy, as one phrase for the progress line."""
    done = [
        (r.result.acc_final, r.spec)
        for r in rows
        if r.status == "finished" and r.result is not None and r.result.acc_final is not None
    ]
    if not done:
        return "none yet"
    acc, spec = max(done, key=lambda pair: pair[0])
    return f"{spec.method} d={spec.density:g} s={spec.seed}: {100 * acc:.2f} %"


def run_study(
    study: Study,
    study_dir: Path,
    *,
    jobs: int | None = None,
    extra: Sequence[str] = (),
    root: Path = REPO_ROOT,
    python: str = sys.executable,
    threads: int | None = None,
    poll_s: float = 0.2,
) -> StudyReport:
    """Run every unfinished run of ``study`` as ``cli.py fit`` subprocesses, then write the results.

    Args:
        study: the grid (:func:`~er_lightning.reproduce.studies.build_study`).
        study_dir: the study's folder (created); results go to ``results.csv``, ``results.md``, ``<group>.png``.
        jobs: processes at once; ``None`` = one per GPU for GPU studies (when GPUs exist), else 1.
        extra: ``cli.py`` arguments appended to every run.
        root: repository root the commands run in.
        python: interpreter of the subprocesses.
        threads: ``OMP_NUM_THREADS`` of each CPU subprocess; ``None`` = CPU count // jobs (an existing
            ``OMP_NUM_THREADS`` in the environment wins).
        poll_s: seconds between checks of the running processes.

    Returns:
        A :class:`StudyReport`. Failed runs are listed there (their output is in ``fit.log``); the others go on.

    Raises:
        ValueError: ``jobs`` or ``threads`` below 1, or a run folder written with other arguments (see :func:`plan`).
        RuntimeError: a GPU study on a machine without GPUs (pass ``--trainer.accelerator=cpu`` in ``extra`` to
            force the CPU).
    """
    _check_root(root)
    for name, value in (("jobs", jobs), ("threads", threads)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be an int >= 1 or None, got {value!r}")
    planned = plan(study, study_dir, extra, root=root)
    todo = [p for p in planned if p.action != "skip"]
    wants_gpu = any(p.spec.accelerator == "gpu" for p in todo) and not any(
        a.startswith("--trainer.accelerator") for a in extra
    )
    gpus = _gpu_count() if wants_gpu else 0
    if wants_gpu and gpus == 0:
        raise RuntimeError(
            f"study {study.name!r} runs on GPUs and this machine has none; run its commands where GPUs are "
            "(--print-commands), or force the CPU with '-- --trainer.accelerator=cpu'"
        )
    slots = jobs if jobs is not None else max(1, gpus)
    per_job_threads = threads if threads is not None else max(1, (os.cpu_count() or 1) // slots)
    skipped = tuple(p.spec.run_id for p in planned if p.action == "skip")
    log.info(
        "%s: %d runs, %d finished already, %d to run (%d resumed), %d at once -> %s",
        study.name,
        len(planned),
        len(skipped),
        len(todo),
        sum(p.action == "resume" for p in todo),
        slots,
        study_dir,
    )
    finished: list[str] = []
    failed: list[str] = []
    running: dict[int, tuple[Planned, subprocess.Popen[bytes], float]] = {}  # slot -> run
    queue = list(todo)
    start = time.monotonic()
    try:
        while queue or running:
            for slot in range(slots):
                if slot in running or not queue:
                    continue
                item = queue.pop(0)
                running[slot] = (
                    item,
                    _launch(item, study_dir, root, python, slot, gpus, per_job_threads),
                    time.monotonic(),
                )
            time.sleep(poll_s)
            for slot, (item, proc, began) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[slot]
                result = read_run(run_dir(study_dir, item.spec))
                if code == 0 and result is not None and result.finished:
                    finished.append(item.spec.run_id)
                    outcome = f"acc {100 * (result.acc_final or 0.0):.2f} %"
                else:
                    failed.append(item.spec.run_id)
                    outcome = f"FAILED (exit {code}; see {run_dir(study_dir, item.spec) / 'fit.log'})"
                done = len(skipped) + len(finished) + len(failed)
                # wall time per completed run so far (parallel slots included) times the runs left
                eta = (time.monotonic() - start) / (len(finished) + len(failed)) * (len(queue) + len(running))
                log.info(
                    "[%d/%d] %s %s in %.1f s | best: %s | ETA %.0f s",
                    done,
                    len(planned),
                    item.spec.run_id,
                    outcome,
                    time.monotonic() - began,
                    _best(collect(study, study_dir)),
                    eta,
                )
    except BaseException:
        for _, proc, _ in running.values():
            proc.terminate()
        for _, proc, _ in running.values():
            proc.wait()
        raise
    outputs = write_outputs(study, study_dir, collect(study, study_dir))
    if failed:
        log.warning("%d runs failed: %s", len(failed), ", ".join(failed))
    log.info("results: %s", ", ".join(str(p) for p in outputs))
    return StudyReport(skipped, tuple(finished), tuple(failed), tuple(outputs))


def _launch(
    item: Planned, study_dir: Path, root: Path, python: str, slot: int, gpus: int, threads: int
) -> subprocess.Popen[bytes]:
    folder = run_dir(study_dir, item.spec)
    folder.mkdir(parents=True, exist_ok=True)
    base = item.args[:-1] if item.action == "resume" else item.args
    (folder / "command.json").write_text(json.dumps(base, indent=1))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(threads))
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
    log.info("%s %s", "resume" if item.action == "resume" else "start", item.spec.run_id)
    with (folder / "fit.log").open("ab") as out:
        return subprocess.Popen(
            [python, "cli.py", *item.args], cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env
        )
