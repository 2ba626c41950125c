"""Regenerate the README figures from two real runs on the bundled digits (CPU, about a minute in all).

1. the quickstart (``configs/quickstart.yaml``: small CNN, StaticSparsity ERK 0.1, 10 epochs), through the CLI;
2. RigL on the same model and data (ERK 0.1, an update every 20 steps, drop fraction 0.3, updates until 75 %).

The PNGs are the figures exactly as TensorBoard shows them: the last image of each tag is read back from the
runs' event files and written to ``docs/figures/``.

Usage::

    python benchmarks/readme_figures.py            # runs go to runs/readme_figures/, PNGs to docs/figures/
"""

from __future__ import annotations

import argparse  # noqa: TID251 - a script, not library configuration
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from er_lightning import RigL, SparseLightningModule
from er_lightning.cli import main as cli_main
from er_lightning.data import DigitsDataModule

ROOT = Path(__file__).resolve().parents[1]

#: (run, TensorBoard image tag) → file name under docs/figures.
FIGURES = {
    ("quickstart", "sparsity/layer_densities"): "quickstart_layer_densities.png",
    ("rigl", "sparsity/layer_densities"): "rigl_layer_densities.png",
    ("rigl", "sparsity/density_heatmap"): "rigl_density_heatmap.png",
    ("rigl", "dst/itop_overlap"): "rigl_itop_overlap.png",
    ("rigl", "sparsity/dead_units"): "rigl_dead_units.png",
}


def run_quickstart(save_dir: Path) -> Path:
    """The quickstart through the CLI, logging under ``save_dir``; returns the run's log folder."""
    cli = cli_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "quickstart.yaml"),
            f"--trainer.logger.init_args.save_dir={save_dir}",
            f"--checkpoint.dirpath={save_dir / 'quickstart' / 'checkpoints'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    return Path(cli.trainer.log_dir)


def run_rigl(save_dir: Path) -> Path:
    """RigL from an ERK 0.1 start on the quickstart's model, data and optimizer; returns the log folder."""
    pl.seed_everything(0)
    module = SparseLightningModule(
        "small_cnn",
        num_classes=10,
        optimizer="sgd",
        lr=0.05,
        momentum=0.9,
        nesterov=True,
        weight_decay=5e-4,
        lr_schedule="cosine",
        warmup_epochs=1,
    )
    logger = TensorBoardLogger(str(save_dir), name="rigl", default_hp_metric=False)
    rigl = RigL(
        density=0.1, distribution="erk", update_every_steps=20, drop_fraction=0.3, stop_updates_at=0.75
    )
    trainer = pl.Trainer(
        max_epochs=10,
        accelerator="cpu",
        devices=1,
        logger=logger,
        callbacks=[rigl],
        log_every_n_steps=5,
        enable_progress_bar=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64, split_seed=0))
    return Path(logger.log_dir)


def export(log_dirs: dict[str, Path], out: Path) -> list[Path]:
    """Write the last image of each tag in :data:`FIGURES` as PNG; returns the files written."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for (run, tag), filename in FIGURES.items():
        acc = EventAccumulator(str(log_dirs[run]), size_guidance={"images": 0})
        acc.Reload()
        images = acc.Images(tag)
        if not images:
            raise RuntimeError(f"run {run!r} logged no image {tag!r}; tags: {acc.Tags()['images']}")
        path = out / filename
        path.write_bytes(images[-1].encoded_image_string)
        written.append(path)
    return written


def main() -> None:
    """Run both trainings and export the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-dir", type=Path, default=ROOT / "runs" / "readme_figures")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "figures")
    args = parser.parse_args()
    logs = {"quickstart": run_quickstart(args.save_dir), "rigl": run_rigl(args.save_dir)}
    for path in export(logs, args.out):
        print(path)
    print("runs:", *logs.values())


if __name__ == "__main__":
    main()
