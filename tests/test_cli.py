from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from er_lightning.callbacks.checkpoint import ResumableCheckpoint
from er_lightning.cli import main
from er_lightning.module import SparseLightningModule

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
# Every experiment config; configs/trainer/* are trainer-only fragments, parsed in their own test.
EXPERIMENT_CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if p.relative_to(ROOT / "configs").parts[0] != "trainer"
)
TRAINER_FRAGMENTS = sorted((ROOT / "configs" / "trainer").glob("*.yaml"))


@pytest.fixture(autouse=True)
def _no_cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when ``args`` are given while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def scalars(log_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _lr_series(run_dir: Path) -> list[tuple[int, float]]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars("lr")]


def test_fit_then_test_through_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the config's relative runs/ folder lands here
    short = [
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=2",
        "--trainer.limit_test_batches=2",
    ]
    cli = main(
        [
            "fit",
            "--config",
            QUICKSTART,
            "--trainer.max_epochs=2",
            "--trainer.log_every_n_steps=1",
            "--model.lr_schedule=constant",
            "--model.lr=0.02",
            "--model.warmup_epochs=0",
            *short,
            *QUIET,
        ]
    )
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert Path(cli.trainer.log_dir).resolve() == run_dir
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["lr"] == 0.02
    assert saved["model"]["backbone"] == "small_cnn"

    values = scalars(run_dir)
    for tag in ("train/loss", "train/loss_step", "train/acc", "val/loss", "val/acc", "val/acc_top5", "lr"):
        assert tag in values, f"{tag} missing from {sorted(values)}"
        assert all(math.isfinite(v) for v in values[tag])
    assert len(values["lr"]) == 6  # 2 epochs x 3 steps, logged every step
    assert values["lr"] == pytest.approx([0.02] * 6)
    assert all(0.0 <= v <= 1.0 for v in values["val/acc"])

    # `test --ckpt_path last`, as the Makefile's demo target runs it, in a fresh CLI.
    last = tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    tested = main(["test", "--config", QUICKSTART, "--ckpt_path", "last", *short, *QUIET])
    assert 0.0 <= float(tested.trainer.callback_metrics["test/acc"]) <= 1.0
    trained = cli.model.state_dict()
    for name, tensor in tested.model.state_dict().items():
        assert torch.equal(tensor, trained[name]), name

    # The backbone name is in the hyper-parameters, so the checkpoint loads without the CLI.
    loaded = SparseLightningModule.load_from_checkpoint(last)
    assert loaded.hparams.backbone == "small_cnn"
    assert torch.equal(loaded.model.classifier.weight, trained["model.classifier.weight"])


def test_help_lists_module_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in (
        "--model.label_smoothing",
        "--model.lr_schedule",
        "--model.param_groups",
        "--checkpoint.dirpath",
    ):
        assert option in out


@pytest.mark.parametrize("config", EXPERIMENT_CONFIGS, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_every_config_parses_and_instantiates(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["data"]["class_path"].startswith("er_lightning.data.")

    # Building model, data module and trainer must not read data or create folders (CIFAR files are absent here).
    cli = main(["--config", str(config)], run=False)
    assert isinstance(cli.model, SparseLightningModule)
    assert cli.model.num_classes == printed["model"]["num_classes"]
    assert getattr(cli.datamodule, "num_classes", cli.model.num_classes) == cli.model.num_classes
    assert list(tmp_path.iterdir()) == []
    # A resumable last.ckpt every epoch, whatever the config monitors (tests/integration/test_resume.py).
    (checkpoint,) = [cb for cb in cli.trainer.callbacks if isinstance(cb, ResumableCheckpoint)]
    assert checkpoint.save_last is True and checkpoint.dirpath


def test_trainer_fragments_compose(capsys: pytest.CaptureFixture[str]) -> None:
    assert {p.name for p in TRAINER_FRAGMENTS} >= {"cpu.yaml", "gpu.yaml", "ddp.yaml"}
    for fragment in TRAINER_FRAGMENTS:
        with pytest.raises(SystemExit):
            main(["fit", "--config", QUICKSTART, "--config", str(fragment), "--print_config"])
        capsys.readouterr()
    with pytest.raises(SystemExit):
        main(
            [
                "fit",
                "--config",
                QUICKSTART,
                "--config",
                str(ROOT / "configs" / "trainer" / "gpu.yaml"),
                "--config",
                str(ROOT / "configs" / "trainer" / "ddp.yaml"),
                "--print_config",
            ]
        )
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert (trainer["accelerator"], trainer["strategy"], trainer["sync_batchnorm"]) == ("gpu", "ddp", True)
    assert trainer["max_epochs"] == 10  # the experiment's value survives


@pytest.mark.dist
def test_ddp_fit_through_cli_two_cpu_processes(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("MASTER_PORT", None)
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.strategy=ddp",
        "--trainer.devices=2",
        "--trainer.accelerator=cpu",
        "--trainer.sync_batchnorm=false",  # SyncBatchNorm needs GPUs
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
        "--trainer.limit_val_batches=2",
        "--trainer.log_every_n_steps=1",
        *QUIET,
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = tmp_path / "runs" / "quickstart" / "checkpoints" / "last.ckpt"
    assert last.is_file()
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["global_step"] == 4
    run_dir = tmp_path / "runs" / "quickstart" / "version_0"
    assert list(run_dir.glob("events.out.tfevents.*"))
    assert not (tmp_path / "runs" / "quickstart" / "version_1").exists()  # one run folder for both ranks
    values = scalars(run_dir)
    assert len(values["lr"]) == 4
    assert all(math.isfinite(v) for v in values["train/loss_step"])
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["trainer"]["strategy"] == "ddp"
    assert str(saved["trainer"]["devices"]) == "2"


def test_resume_continues_the_lr_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    common = [
        "--config",
        QUICKSTART,
        "--trainer.max_epochs=3",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1",
        "--model.warmup_epochs=1",
        *QUIET,
    ]
    main(["fit", *common, "--checkpoint.save_top_k=-1", "--checkpoint.dirpath=every_epoch"])
    (first_epoch,) = (tmp_path / "every_epoch").glob("epoch=0-*.ckpt")
    main(["fit", *common, "--ckpt_path", str(first_epoch), "--checkpoint.dirpath=resumed"])
    full = dict(_lr_series(tmp_path / "runs/quickstart/version_0"))
    resumed = _lr_series(tmp_path / "runs/quickstart/version_1")
    assert [s for s, _ in resumed] == [2, 3, 4, 5]
    assert [v for _, v in resumed] == pytest.approx([full[s] for s, _ in resumed])
    assert full[0] == pytest.approx(0.05 / 2)  # warm-up: lr * 1 / 2 warm-up steps
