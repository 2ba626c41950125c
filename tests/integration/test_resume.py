"""Nothing lost on a crash: every shipped config leaves an epoch-fresh last.ckpt, and `--ckpt_path last` resumes it
or fails loudly (issue 12 #1); resuming names the given hyper-parameters the checkpoint overrides (#11)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from er_lightning.callbacks.checkpoint import ResumableCheckpoint
from er_lightning.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
EXPERIMENT_CONFIGS = sorted(
    p for p in (ROOT / "configs").rglob("*.yaml") if p.relative_to(ROOT / "configs").parts[0] != "trainer"
)
SHORT = [
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture(autouse=True)
def _no_cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def _epoch_of(path: Path) -> tuple[int, int]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return checkpoint["epoch"], checkpoint["global_step"]


def test_sigkill_mid_epoch_then_resume_last_through_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The quickstart as shipped (save_top_k: 0), killed in epoch 2: last.ckpt holds epoch 1 and resumes from it."""
    monkeypatch.chdir(tmp_path)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "integration")]),
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }
    cmd = [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--config",
        QUICKSTART,
        "--trainer.max_epochs=4",
        *SHORT,
        '--trainer.callbacks+={"class_path": "killing.SigkillAt", "init_args": {"epoch": 2, "batch": 1}}',
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-3000:]  # killed, not finished
    folder = tmp_path / "runs" / "quickstart" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt"]
    assert _epoch_of(folder / "last.ckpt") == (1, 4)  # epochs 0 and 1 done, 2 steps each
    killed_masks = torch.load(folder / "last.ckpt", map_location="cpu", weights_only=True)["callbacks"][
        "StaticSparsity"
    ]["masks"]

    # #11: LightningCLI takes model.* from the checkpoint; a value given on the command line is named as ignored.
    with pytest.warns(
        UserWarning, match=r"these given values are ignored: model\.lr: given 0\.5, checkpoint 0\.05"
    ):
        resumed = main(
            [
                "fit",
                "--config",
                QUICKSTART,
                "--trainer.max_epochs=4",
                *SHORT,
                "--model.lr=0.5",
                "--ckpt_path",
                "last",
            ]
        )
    assert resumed.model.hparams.lr == 0.05
    assert resumed.trainer.optimizers[0].param_groups[0]["initial_lr"] == 0.05
    assert resumed.trainer.global_step == 8  # 2 epochs more, not 4 from scratch
    assert Path(resumed.trainer.ckpt_path).resolve() == folder / "last.ckpt"
    masks = resumed.trainer.callbacks[0].masked.masks
    assert all(torch.equal(masks[n], killed_masks[n]) for n in killed_masks)
    assert _epoch_of(folder / "last.ckpt") == (3, 8)


def test_ckpt_path_last_without_a_checkpoint_fails_loudly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError, match=r"no last\*\.ckpt in checkpoint\.dirpath='runs/quickstart/checkpoints'"
    ):
        main(["fit", "--config", QUICKSTART, *SHORT, "--ckpt_path", "last"])
    with pytest.raises(FileNotFoundError, match="test --ckpt_path last: checkpoint.dirpath is not set"):
        main(["test", "--config", QUICKSTART, *SHORT, "--checkpoint.dirpath=null", "--ckpt_path", "last"])
    assert not (tmp_path / "runs").exists()  # nothing was trained or logged


def _shipped_checkpoint_settings() -> list[dict]:
    """The distinct (monitor, mode, save_top_k, save_last) of every experiment config's checkpoint section."""
    seen = {}
    for path in EXPERIMENT_CONFIGS:
        section = dict(yaml.safe_load(path.read_text()).get("checkpoint") or {})
        section.pop("dirpath", None)
        seen[tuple(sorted(section.items()))] = section
    return list(seen.values())


class _ValAccFallsAfterEpoch0(pl.LightningModule):
    """`val/acc` is best in epoch 0 and falls after, so a monitored checkpoint never improves again."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def validation_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        self.log("val/acc", 1.0 / (1 + self.current_epoch))
        self.log("val/loss", float(self.current_epoch))

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _LastCkptProbe(Callback):
    """At every epoch start (and at the end) record the epoch held by last.ckpt."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: list[int | None] = []

    def _record(self) -> None:
        self.seen.append(_epoch_of(self.path)[0] if self.path.is_file() else None)

    def on_train_epoch_start(self, trainer, pl_module):  # noqa: ANN001, ANN201
        if trainer.current_epoch > 0:
            self._record()

    def on_train_end(self, trainer, pl_module):  # noqa: ANN001, ANN201
        self._record()


@pytest.mark.parametrize(
    "settings",
    [*_shipped_checkpoint_settings(), {"monitor": "val/loss", "mode": "min", "save_top_k": 2}],
    ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()),
)
def test_every_shipped_checkpoint_setting_refreshes_last_every_epoch(tmp_path: Path, settings: dict) -> None:
    assert settings.get("save_last", True) is not False
    checkpoint = ResumableCheckpoint(dirpath=tmp_path, save_last=True, **settings)
    probe = _LastCkptProbe(tmp_path / "last.ckpt")
    data = DataLoader(TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,))), batch_size=4)
    trainer = pl.Trainer(
        max_epochs=4,
        callbacks=[probe, checkpoint],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(_ValAccFallsAfterEpoch0(), data, data)
    assert probe.seen == [0, 1, 2, 3]  # before each epoch k, last.ckpt holds epoch k - 1
