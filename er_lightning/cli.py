"""Command line: ``LightningCLI`` over :class:`~er_lightning.module.SparseLightningModule` and any data module.

Every option comes from a constructor signature, so ``er-lightning fit --help`` (or ``python cli.py fit --help``)
lists them all. Experiments are YAML files combined with repeated ``--config``; the resolved configuration is saved
as ``config.yaml`` next to the TensorBoard events of each run.

Example:
    Train the quickstart, then test its last checkpoint::

        python cli.py fit --config configs/quickstart.yaml
        python cli.py test --config configs/quickstart.yaml --ckpt_path last
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from typing_extensions import override

from er_lightning.module import SparseLightningModule

__all__ = ["TRAINER_DEFAULTS", "SparseCLI", "main"]

#: Trainer defaults of the CLI: TensorBoard logs under ``runs/<name>/version_N`` (configs set ``name``).
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
    },
}


class SparseCLI(LightningCLI):
    """``LightningCLI`` with a configurable ``checkpoint`` (a ``ModelCheckpoint`` keeping ``last.ckpt``).

    The checkpoint callback is always present, so ``test --ckpt_path last`` can find the last checkpoint of a
    previous ``fit``. By default it writes into the run's log folder (``runs/<name>/version_N/checkpoints``), which
    a later process cannot know; set ``checkpoint.dirpath`` to a fixed folder in the config when a separate
    ``test``/``validate`` run should pick up ``last`` (``configs/quickstart.yaml`` does).
    """

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``checkpoint`` group (``ModelCheckpoint`` arguments, ``save_last`` on by default)."""
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})


def main(args: ArgsType = None, run: bool = True) -> SparseCLI:
    """Run the command line (``fit``, ``validate``, ``test``, ``predict``) and return the CLI object.

    Args:
        args: arguments as on the command line (``["fit", "--config", "configs/quickstart.yaml"]``) or a config
            dict; ``None`` reads ``sys.argv``.
        run: ``False`` parses and instantiates without a subcommand (then ``args`` carry no subcommand).

    Returns:
        The ``SparseCLI``; ``cli.trainer``, ``cli.model`` and ``cli.datamodule`` are the instantiated objects.
    """
    return SparseCLI(
        SparseLightningModule,
        pl.LightningDataModule,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        trainer_defaults=TRAINER_DEFAULTS,
        seed_everything_default=0,
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


if __name__ == "__main__":
    main()
