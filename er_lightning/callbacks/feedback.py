"""Feedback during long set-up work on rank zero: a progress bar in a terminal, log lines otherwise.

SynFlow's rounds, the SNIP/GraSP batches and ortho repair run inside ``setup``, before Lightning shows anything;
on a CPU they can take minutes. :func:`progress_reporter` turns the library's
:func:`~er_lightning.sparsity.progress.report` calls into a ``tqdm`` bar when rank zero writes to a terminal and
the trainer shows a progress bar, and into ``logging`` lines (start, every 10 %, end) otherwise; other ranks stay
silent.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from er_lightning.sparsity.progress import Reporter

__all__ = ["LogReporter", "progress_reporter"]

log = logging.getLogger(__name__)


def _values(values: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.6g}" for k, v in values.items())


class LogReporter:
    """Log lines for each task: the first unit, every tenth of the total, and the last.

    Args:
        owner: prefix of every line (the callback's name).
        bar: draw a ``tqdm`` bar per task instead (on a terminal).

    Example:
        >>> rep = LogReporter("StaticSparsity")
        >>> for r in range(1, 101):
        ...     rep("synflow rounds", r, 100, {})   # logs at 1, 10, 20, ..., 100
        >>> rep.lines
        11
    """

    def __init__(self, owner: str, bar: bool = False) -> None:
        self.owner = owner
        self.bar = bar
        self.lines = 0
        self._bars: dict[str, Any] = {}

    def __call__(self, task: str, done: int, total: int, values: Mapping[str, float]) -> None:
        """Show that ``done`` of ``total`` units of ``task`` are finished."""
        if self.bar:
            self._draw(task, done, total, values)
            return
        decile = 10 * done // max(total, 1)
        previous = 10 * (done - 1) // max(total, 1)
        if done in (1, total) or decile != previous:
            self.lines += 1
            extra = f" ({_values(values)})" if values else ""
            log.info("%s: %s %d/%d%s", self.owner, task, done, total, extra)

    def _draw(self, task: str, done: int, total: int, values: Mapping[str, float]) -> None:
        from tqdm.auto import tqdm

        bar = self._bars.get(task)
        if bar is None:
            bar = self._bars[task] = tqdm(
                total=total, desc=f"{self.owner}: {task}", leave=True, dynamic_ncols=True
            )
        bar.update(done - bar.n)
        if values:
            bar.set_postfix_str(_values(values), refresh=False)
        if done >= total:
            bar.close()
            del self._bars[task]


def progress_reporter(trainer: pl.Trainer, owner: str) -> Reporter | None:
    """The reporter for ``trainer``'s rank: ``None`` off rank zero, a bar on a terminal, log lines otherwise."""
    if rank_zero_only.rank != 0:
        return None
    bar = trainer.progress_bar_callback is not None and sys.stderr.isatty()
    return LogReporter(owner, bar=bar)
