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

import os
import re
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.cli import ArgsType, LightningArgumentParser, LightningCLI
from pytorch_lightning.utilities import rank_zero_warn
from typing_extensions import override

from er_lightning.callbacks.checkpoint import ResumableCheckpoint
from er_lightning.module import SparseLightningModule

__all__ = ["TRAINER_DEFAULTS", "SparseCLI", "find_last_checkpoint", "main"]

#: Trainer defaults of the CLI: TensorBoard logs under ``runs/<name>/version_N`` (configs set ``name``).
TRAINER_DEFAULTS: dict[str, Any] = {
    "logger": {
        "class_path": "pytorch_lightning.loggers.TensorBoardLogger",
        "init_args": {"save_dir": "runs", "name": "default", "default_hp_metric": False},
    },
}


#: ``last.ckpt``, ``last-v1.ckpt``, ...: the names ``ModelCheckpoint(save_last=True)`` writes.
_LAST_NAME = re.compile(r"^last(-v\d+)?\.ckpt$")


def find_last_checkpoint(dirpath: str | os.PathLike[str]) -> str | None:
    """The newest ``last*.ckpt`` in ``dirpath`` (as Lightning resolves ``ckpt_path="last"``), or ``None``."""
    folder = Path(dirpath)
    if not folder.is_dir():
        return None
    found = [p for p in folder.iterdir() if p.is_file() and _LAST_NAME.match(p.name)]
    return str(max(found, key=lambda p: p.stat().st_mtime)) if found else None


class SparseCLI(LightningCLI):
    """``LightningCLI`` with a configurable ``checkpoint`` (a :class:`ResumableCheckpoint` keeping ``last.ckpt``).

    The checkpoint callback is always present and refreshes ``last.ckpt`` at the end of every epoch, whatever it
    monitors, so a killed run resumes with ``--ckpt_path last`` and ``test --ckpt_path last`` finds the last
    checkpoint of a previous ``fit``. By default it writes into the run's log folder
    (``runs/<name>/version_N/checkpoints``), which a later process cannot know; every shipped config sets
    ``checkpoint.dirpath`` to a fixed folder.

    ``--ckpt_path last`` is resolved here, before anything is built: to the newest ``last*.ckpt`` in
    ``checkpoint.dirpath``, and an error when there is none (Lightning would warn and train from scratch).
    As for any checkpoint path, ``LightningCLI`` then takes the module's hyper-parameters (``model.*``) from the
    checkpoint, so ``--model.lr 0.5`` on a resume has no effect: a warning lists every such value; start a new run
    (or load the weights into a fresh one) to change them.
    """

    @override
    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """Subcommand parsers with a one-line usage: a bad value prints that line and the error, not every option
        (``fit --help`` still lists them all)."""
        if "description" in kwargs:  # a subcommand (fit, validate, test, predict)
            kwargs.setdefault("usage", "%(prog)s [-h] [-c CONFIG] [--print_config] [--KEY VALUE ...]")
        return super().init_parser(**kwargs)

    @override
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """Add the ``checkpoint`` group (``ResumableCheckpoint`` arguments, ``save_last`` on by default)."""
        parser.add_lightning_class_args(ResumableCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    @override
    def _parse_ckpt_path(self) -> None:
        """Resolve ``ckpt_path="last"`` loudly, then load hyper-parameters and say which given values they replace."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return super()._parse_ckpt_path()
        config = self.config[subcommand]
        if config.get("ckpt_path") == "last":
            dirpath = config.get("checkpoint.dirpath")
            found = find_last_checkpoint(dirpath) if dirpath else None
            if found is None:
                where = (
                    f"no last*.ckpt in checkpoint.dirpath={dirpath!r}"
                    if dirpath
                    else "checkpoint.dirpath is not set, so the checkpoints of an earlier run are in its own "
                    "runs/<name>/version_N/checkpoints folder"
                )
                raise FileNotFoundError(
                    f"{subcommand} --ckpt_path last: {where}. Nothing to resume from, so nothing was run (Lightning "
                    "would silently start from scratch). Pass the checkpoint file (--ckpt_path PATH), set "
                    "--checkpoint.dirpath to the folder of the earlier run, or drop --ckpt_path to start a new run"
                )
            config["ckpt_path"] = found
        given = _flat(config.get("model"))
        super()._parse_ckpt_path()
        loaded = _flat(self.config[subcommand].get("model"))
        replaced = {k: (v, loaded.get(k)) for k, v in given.items() if k in loaded and loaded[k] != v}
        if replaced:
            detail = ", ".join(f"model.{k}: given {a!r}, checkpoint {b!r}" for k, (a, b) in replaced.items())
            rank_zero_warn(
                f"{subcommand} --ckpt_path {self.config[subcommand].get('ckpt_path')}: the module's "
                f"hyper-parameters come from the checkpoint, so these given values are ignored: {detail}. "
                "Start a new run to change them."
            )


def _flat(namespace: Any) -> dict[str, Any]:
    """A jsonargparse namespace (or dict) as ``{"a.b": value}``."""
    if namespace is None:
        return {}
    items = namespace.as_dict() if hasattr(namespace, "as_dict") else dict(namespace)
    out: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, dict) and value and "class_path" not in value:
            out.update({f"{key}.{k}": v for k, v in _flat(value).items()})
        else:
            out[key] = value
    return out


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
