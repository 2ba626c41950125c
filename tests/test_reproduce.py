"""``python -m er_lightning.reproduce``: study grids, real subprocess runs, resume, commands, table, CSV, figure."""

from __future__ import annotations

import csv
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
import pytorch_lightning as pl
import yaml
from jsonargparse import ArgumentParser
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.tensorboard import SummaryWriter

from er_lightning.cli import SparseCLI, main
from er_lightning.reproduce import (
    RunResult,
    RunSpec,
    Study,
    build_study,
    collect,
    markdown_table,
    plan,
    plot_group,
    print_commands,
    read_run,
    run_study,
)
from er_lightning.reproduce.__main__ import main as reproduce_main
from er_lightning.reproduce.results import Row

ROOT = Path(__file__).resolve().parents[1]
# One epoch of 3 training batches: seconds per run, still a real fit with validation on the test split.
FAST = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.enable_model_summary=false"]


def _parse(args: list[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    """What ``cli.py`` makes of ``args`` (after ``fit``) as a config, without building anything."""
    monkeypatch.setattr(SparseCLI, "instantiate_classes", lambda self: None)
    cli = main(args, run=False)
    return yaml.safe_load(cli.parser.dump(cli.config, skip_none=False))


def _command_args(line: str) -> list[str]:
    """A printed ``python cli.py fit ...`` line -> the arguments after ``fit``."""
    words = shlex.split(line)
    assert words[:3] == ["python", "cli.py", "fit"]
    return words[3:]


def _events_acc(run_dir: Path) -> float:
    acc = EventAccumulator(str(run_dir / "logs"))
    acc.Reload()
    return acc.Scalars("val/acc")[-1].value


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """2 densities × 2 rules × 1 seed of digits-ratios, run for real (subprocesses of cli.py)."""
    old_argv = sys.argv
    sys.argv = ["cli.py"]
    study = build_study("digits-ratios", densities=[0.5, 0.1], methods=["uniform", "erk"], seeds=[0])
    study_dir = tmp_path_factory.mktemp("reproduce") / study.name
    commands = print_commands(study, study_dir, FAST)  # before running: every run is still to do
    report = run_study(study, study_dir, jobs=2, threads=1, extra=FAST)
    sys.argv = old_argv
    return study, study_dir, commands, report


def test_tiny_study_runs_every_run_and_writes_csv(tiny) -> None:  # noqa: ANN001
    study, study_dir, _, report = tiny
    ids = [s.run_id for s in study.runs]
    assert ids == [
        "small_cnn-digits-uniform-d0.5-s0",
        "small_cnn-digits-uniform-d0.1-s0",
        "small_cnn-digits-erk-d0.5-s0",
        "small_cnn-digits-erk-d0.1-s0",
    ]
    assert sorted(report.finished) == sorted(ids)
    assert report.failed == () and report.skipped == ()
    with (study_dir / "results.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["run_id"] for r in rows] == ids
    for row, spec in zip(rows, study.runs):
        assert (row["method"], float(row["density"]), int(row["seed"])) == (
            spec.method,
            spec.density,
            spec.seed,
        )
        assert row["status"] == "finished"
        assert (row["epochs_done"], row["max_epochs"]) == ("1", "1")
        # the CSV's accuracy is the run's own last val/acc event, read independently here
        acc = _events_acc(study_dir / "runs" / spec.run_id)
        assert float(row["acc_final"]) == pytest.approx(acc, abs=1e-6)
        assert 0.0 <= acc <= 1.0
    by_id = {r["run_id"]: r for r in rows}
    # uniform keeps exactly round(d · n) of 288 + 18,432 + 10,240 weights: 0.5 and 2,896 / 28,960 = 0.1
    assert float(by_id["small_cnn-digits-uniform-d0.5-s0"]["density_final"]) == pytest.approx(0.5, abs=1e-6)
    assert float(by_id["small_cnn-digits-uniform-d0.1-s0"]["density_final"]) == pytest.approx(0.1, abs=1e-6)
    assert float(by_id["small_cnn-digits-erk-d0.1-s0"]["density_final"]) == pytest.approx(0.1, abs=2e-4)


def test_tiny_study_table_holds_the_runs_numbers(tiny) -> None:  # noqa: ANN001
    study, study_dir, _, _ = tiny
    accs = {(s.method, s.density): _events_acc(study_dir / "runs" / s.run_id) for s in study.runs}
    text = (study_dir / "results.md").read_text()
    assert "| method | d = 0.5 | d = 0.1 |" in text
    assert "Finished runs: 4 of 4." in text
    assert "(1 epochs per run)" in text
    for method in ("uniform", "erk"):
        match = re.search(rf"^\| {method} \| (.+?) \| (.+?) \|$", text, flags=re.MULTILINE)
        assert match is not None, text
        for cell, density in zip(match.groups(), (0.5, 0.1)):
            best = max(accs[(m, density)] for m in ("uniform", "erk"))
            expected = f"{100 * accs[(method, density)]:.2f}"
            assert cell == (f"**{expected}**" if accs[(method, density)] == best else expected)
    assert "![small_cnn-digits](small_cnn-digits.png)" in text


def test_tiny_study_figure_plots_the_runs_numbers(tiny) -> None:  # noqa: ANN001
    study, study_dir, _, _ = tiny
    image = matplotlib.image.imread(study_dir / "small_cnn-digits.png")
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 400
    fig = plot_group(study, collect(study, study_dir), "small_cnn-digits")
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["uniform", "erk"]
    assert [c.get_label() for c in ax.containers] == ["uniform", "erk"]  # one error-bar line per rule
    for container, method in zip(ax.containers, ("uniform", "erk")):
        expected = [
            100 * _events_acc(study_dir / "runs" / f"small_cnn-digits-{method}-d{d}-s0")
            for d in ("0.1", "0.5")
        ]
        line = container.lines[0]
        assert list(line.get_xdata()) == [0.1, 0.5]
        assert list(line.get_ydata()) == pytest.approx(expected, abs=1e-6)


def test_resume_skips_finished_runs(tiny) -> None:  # noqa: ANN001
    study, study_dir, _, _ = tiny
    logs = {s.run_id: (study_dir / "runs" / s.run_id / "fit.log").stat().st_size for s in study.runs}
    assert [p.action for p in plan(study, study_dir, FAST)] == ["skip"] * 4
    report = run_study(study, study_dir, jobs=1, threads=1, extra=FAST)
    assert sorted(report.skipped) == sorted(logs) and report.finished == () and report.failed == ()
    # no subprocess ran: nothing was appended to any run's output
    assert {s.run_id: (study_dir / "runs" / s.run_id / "fit.log").stat().st_size for s in study.runs} == logs
    assert print_commands(study, study_dir, FAST) == []


def test_other_arguments_in_the_same_folder_are_refused(tiny) -> None:  # noqa: ANN001
    study, study_dir, _, _ = tiny
    with pytest.raises(ValueError, match="was run with other arguments"):
        plan(study, study_dir, [*FAST, "--model.lr=0.1"])


def test_print_commands_parse_as_the_configs_the_runs_saved(tiny, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    study, study_dir, commands, _ = tiny
    monkeypatch.chdir(ROOT)  # the commands run from the repository root
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    assert len(commands) == 4
    for line, spec in zip(commands, study.runs):
        parsed = _parse(_command_args(line), monkeypatch)
        saved = yaml.safe_load((study_dir / "runs" / spec.run_id / "logs" / "config.yaml").read_text())
        # fit's own arguments (not part of the config) are absent from the parse without a subcommand
        assert {k: saved.pop(k) for k in set(saved) - set(parsed)} == {
            "ckpt_path": None,
            "weights_only": None,
        }
        assert parsed == saved
        (callback,) = parsed["trainer"]["callbacks"]
        assert callback["class_path"] == "er_lightning.callbacks.StaticSparsity"
        assert (callback["init_args"]["density"], callback["init_args"]["distribution"]) == (
            spec.density,
            spec.method,
        )
        assert parsed["seed_everything"] == callback["init_args"]["seed"] == 0


def test_collect_rebuilds_the_same_results(tiny, capsys: pytest.CaptureFixture[str]) -> None:  # noqa: ANN001
    study, study_dir, _, _ = tiny
    before = (study_dir / "results.md").read_text()
    (study_dir / "results.md").unlink()
    args = ["digits-ratios", "--out", str(study_dir.parent), "--densities", "0.5", "0.1"]
    assert reproduce_main([*args, "--methods", "uniform", "erk", "--seeds", "0", "--collect"]) == 0
    assert (study_dir / "results.md").read_text() == before
    assert str(study_dir / "results.csv") in capsys.readouterr().out


def test_interrupted_run_resumes_from_its_last_checkpoint(tmp_path: Path) -> None:
    study = build_study("digits-ratios", densities=[0.2], methods=["balanced"], seeds=[3])
    study_dir = tmp_path / study.name
    extra = [
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=2",
        "--trainer.enable_model_summary=false",
    ]
    (line,) = print_commands(study, study_dir, extra)
    # The printed command, SIGKILLed as its second epoch starts (the first epoch's checkpoint is written).
    killer = ["--trainer.callbacks+=kill_at_epoch_start.KillAtEpochStart", "--trainer.callbacks.epoch=1"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT)]),
    }
    killed = subprocess.run(
        [sys.executable, "cli.py", "fit", *_command_args(line), *killer],
        cwd=ROOT,
        capture_output=True,
        env=env,
    )
    assert killed.returncode == -9, killed.stderr.decode()[-2000:]
    run = study_dir / "runs" / study.runs[0].run_id
    first = read_run(run)
    assert first is None or not first.finished
    (planned,) = plan(study, study_dir, extra)
    assert planned.action == "resume"
    assert planned.args[-1] == f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}"
    report = run_study(study, study_dir, jobs=1, threads=1, extra=extra)
    assert report.finished == (study.runs[0].run_id,)
    assert "Restoring states from the checkpoint path" in (run / "fit.log").read_text()
    final = read_run(run)
    assert final is not None and final.finished and final.epochs_done == 3
    # the resumed process trained epochs 1 and 2 only (epoch 0 came from the checkpoint)
    files = sorted((run / "logs").glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    acc = EventAccumulator(str(files[-1]))
    acc.Reload()
    assert sorted({int(e.value) for e in acc.Scalars("epoch")}) == [1, 2]
    assert min(e.step for e in acc.Scalars("epoch")) >= 2  # global step continues after epoch 0's 2 steps


# ---------------------------------------------------------------------------------------- no training below


def test_named_grids_have_the_issue_sizes() -> None:
    ratios = build_study("digits-ratios")
    assert len(ratios.runs) == 6 * 5 * 3 + 3  # + dense at density 1 for each seed
    assert len({r.run_id for r in ratios.runs}) == len(ratios.runs)
    assert sorted({r.density for r in ratios.runs if r.method != "dense"}) == [
        0.01,
        0.02,
        0.05,
        0.1,
        0.2,
        0.5,
    ]
    assert ratios.methods == ("uniform", "er", "erk", "balanced", "pyramidal", "dense")
    methods = build_study("digits-methods")
    assert methods.methods == (
        "static",
        "er_snip",
        "snip",
        "rigl",
        "granet",
        "supermask",
        "soft_threshold",
        "dense",
    )
    assert len(methods.runs) == 7 * 2 * 3 + 3
    for name in ("cifar10-paper", "cifar100-paper"):
        study = build_study(name)
        assert {r.accelerator for r in study.runs} == {"gpu"}
        assert len({r.run_id for r in study.runs}) == len(study.runs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"name": "digits"}, ValueError, "study must be one of"),
        ({"name": "digits-ratios", "methods": ["rigl"]}, ValueError, "method of study 'digits-ratios'"),
        (
            {"name": "digits-ratios", "densities": [0.0]},
            ValueError,
            r"density must be a finite number in \(0, 1\]",
        ),
        ({"name": "digits-ratios", "seeds": [1, 1]}, ValueError, "must not repeat"),
        ({"name": "digits-ratios", "seeds": []}, ValueError, "must not be empty"),
        ({"name": "digits-ratios", "seeds": [0.5]}, TypeError, "each seed must be an int"),
    ],
)
def test_bad_study_selection_raises(kwargs: dict, error: type[Exception], match: str) -> None:
    name = kwargs.pop("name")
    with pytest.raises(error, match=match):
        build_study(name, **kwargs)


def _callback(parsed: dict) -> pl.Callback:
    """Build the config's one callback the way LightningCLI does (nested dataclasses such as CosineDrop too)."""
    (cb,) = parsed["trainer"]["callbacks"]
    parser = ArgumentParser()
    parser.add_argument("--callback", type=pl.Callback)
    return parser.instantiate_classes(parser.parse_object({"callback": cb})).callback


@pytest.mark.parametrize("name", ["digits-methods", "cifar10-paper", "cifar100-paper"])
def test_every_method_command_parses_and_builds_its_callback(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One command per method at density 0.02: the overrides exist in each shipped config and build valid callbacks."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    study = build_study(name, densities=[0.02], seeds=[1])
    lines = print_commands(study, tmp_path / name)
    assert len(lines) == len(study.runs) == len(study.methods)
    for line, spec in zip(lines, study.runs):
        parsed = _parse(_command_args(line), monkeypatch)
        assert parsed["seed_everything"] == 1
        if spec.accelerator == "gpu":
            assert parsed["trainer"]["accelerator"] == "gpu"
        if spec.method == "dense":
            continue
        cb = _callback(parsed)
        assert cb.seed == 1
        kind = type(cb).__name__
        if kind == "GraNet":
            assert (cb.init_density, cb.final_density) == (0.04, 0.02)
        elif kind == "Supermask":
            assert (cb.er_density, cb.final_density) == (0.04, 0.02)
        elif kind == "SoftThreshold":
            assert (cb.density, cb.target_density) == (0.04, 0.02)
            assert cb.densities_out is None and cb.masks_out is None  # parallel runs must not share one file
        else:
            assert cb.density == 0.02


def test_gpu_study_on_a_machine_without_gpus_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("er_lightning.reproduce.runner._gpu_count", lambda: 0)
    study = build_study("cifar10-paper", densities=[0.1], methods=["erk"], seeds=[1])
    with pytest.raises(RuntimeError, match="runs on GPUs and this machine has none"):
        run_study(study, tmp_path)
    with pytest.raises(ValueError, match="jobs must be an int >= 1"):
        run_study(study, tmp_path, jobs=0)


def _row(method: str, density: float, seed: int, acc: float | None, epochs: int = 10) -> Row:
    spec = RunSpec("g", method, density, seed, ("configs/digits/static.yaml",))
    if acc is None:
        return Row(spec, None)
    return Row(spec, RunResult(epochs, 10, acc, acc, density, 1.0))


def test_table_cells_are_hand_computed_mean_and_std() -> None:
    rows = [
        _row("erk", 0.1, 0, 0.90),
        _row("erk", 0.1, 1, 0.95),  # mean 92.50, sample std 3.54 (population std would be 2.50)
        _row("erk", 0.01, 0, 0.50),
        _row("erk", 0.01, 1, None),  # missing: one seed left, marked n=1
        _row("uniform", 0.1, 0, 0.80),
        _row("uniform", 0.1, 1, 0.70),
        _row("uniform", 0.01, 0, 0.60, epochs=4),  # partial: not counted
        _row("uniform", 0.01, 1, None),
        _row("dense", 1.0, 0, 0.99),
        _row("dense", 1.0, 1, 0.97),
    ]
    study = Study("s", "a test grid", tuple(r.spec for r in rows), ("uniform", "erk", "dense"))
    text = markdown_table(study, rows)
    assert "| method | d = 0.1 | d = 0.01 |" in text
    assert "| uniform | 75.00 ± 7.07 | – |" in text
    assert "| erk | **92.50 ± 3.54** | **50.00** (n=1) |" in text
    assert "Dense (density 1): 98.00 ± 1.41." in text
    assert "Finished runs: 7 of 10." in text
    assert "mean ± std over 2 seeds (10 epochs per run)." in text
    fig = plot_group(study, rows, "g")
    (ax,) = fig.axes
    uniform, erk = ax.containers
    assert list(uniform.lines[0].get_xdata()) == [0.1]  # its 0.01 cell has no finished run
    assert list(erk.lines[0].get_xdata()) == [0.01, 0.1]
    assert list(erk.lines[0].get_ydata()) == pytest.approx([50.0, 92.5])
    at_001, at_01 = erk.lines[2][0].get_segments()  # the error bars: mean ± sample std, one per density
    assert [at_001[0][1], at_001[1][1]] == pytest.approx([50.0, 50.0])
    assert [at_01[0][1], at_01[1][1]] == pytest.approx([92.5 - 3.5355339, 92.5 + 3.5355339])
    (dense,) = [line for line in ax.get_lines() if line.get_label() == "dense"]
    assert list(dense.get_ydata()) == pytest.approx([98.0, 98.0])
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["uniform", "erk", "dense"]


def _write_log(log_dir: Path, max_epochs: int, events: list[tuple[int, int, float]]) -> None:
    log_dir.mkdir(parents=True)
    (log_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"max_epochs": max_epochs}}))
    writer = SummaryWriter(str(log_dir))
    for i, (step, epoch, acc) in enumerate(events):
        writer.add_scalar("epoch", epoch, step, walltime=1000.0 + i)
        writer.add_scalar("val/acc", acc, step, walltime=1000.0 + i)
    writer.close()


def test_read_run_takes_the_later_of_a_repeated_epoch(tmp_path: Path) -> None:
    # epoch 1 validated, the run killed before its checkpoint, resumed from epoch 0: epoch 1 logged again
    _write_log(tmp_path / "a" / "logs", 3, [(10, 0, 0.5), (20, 1, 0.6), (20, 1, 0.7), (30, 2, 0.65)])
    result = read_run(tmp_path / "a")
    assert result is not None and result.finished
    assert (result.epochs_done, result.max_epochs, result.density_final, result.wall_s) == (3, 3, None, 3.0)
    assert (result.acc_final, result.acc_best) == pytest.approx((0.65, 0.7))  # later 0.7 replaced 0.6
    _write_log(tmp_path / "b" / "logs", 3, [(10, 0, 0.5), (20, 1, 0.6)])
    partial = read_run(tmp_path / "b")
    assert partial is not None and partial.epochs_done == 2 and not partial.finished
    assert read_run(tmp_path / "missing") is None
