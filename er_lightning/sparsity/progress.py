"""Progress of long computations (SynFlow rounds, SNIP/GraSP batches, ortho repair), without a dependency.

Library functions call :func:`report` at each unit of work; it does nothing unless a caller installed a reporter
with :func:`reporting` (a context variable, so nested or concurrent callers do not see each other's). The
callbacks install one that draws a progress bar in a terminal and writes log lines otherwise, on rank zero only.

Example:
    >>> seen = []
    >>> with reporting(lambda task, done, total, values: seen.append((task, done, total))):
    ...     for r in range(1, 3):
    ...         report("synflow round", r, 2)
    >>> seen
    [('synflow round', 1, 2), ('synflow round', 2, 2)]
    >>> report("nobody listens", 1, 1)  # outside `reporting`: a no-op
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["Reporter", "report", "reporting"]

#: ``reporter(task, done, total, values)``: ``done`` of ``total`` units of ``task`` finished; ``values`` are
#: numbers worth showing (e.g. an objective).
Reporter = Callable[[str, int, int, Mapping[str, float]], None]

_REPORTER: ContextVar[Reporter | None] = ContextVar("er_lightning_progress", default=None)


def report(task: str, done: int, total: int, **values: float) -> None:
    """Tell the installed reporter that ``done`` of ``total`` units of ``task`` are finished (else nothing)."""
    reporter = _REPORTER.get()
    if reporter is not None:
        reporter(task, done, total, values)


@contextmanager
def reporting(reporter: Reporter | None) -> Iterator[None]:
    """Install ``reporter`` for :func:`report` calls inside the block (``None``: silence them)."""
    token = _REPORTER.set(reporter)
    try:
        yield
    finally:
        _REPORTER.reset(token)
