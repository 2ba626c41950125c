"""``python -m er_lightning.reproduce STUDY [options] [-- cli.py arguments for every run]``.

Examples (from the repository root)::

    python -m er_lightning.reproduce digits-ratios --jobs 1            # run (or resume) the grid, then tabulate
    python -m er_lightning.reproduce digits-ratios --print-commands    # the runs still to do, one command a line
    python -m er_lightning.reproduce digits-ratios --collect           # only rebuild results.* from the run folders
    python -m er_lightning.reproduce digits-ratios --seeds 0 --densities 0.1 0.01 -- --trainer.max_epochs=3
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from jsonargparse import ArgumentParser

from er_lightning.reproduce.results import collect, write_outputs
from er_lightning.reproduce.runner import REPO_ROOT, print_commands, run_study
from er_lightning.reproduce.studies import STUDIES, build_study

__all__ = ["main"]


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m er_lightning.reproduce",
        description=(
            "Run a named study as independent `cli.py fit` runs of the shipped configs and write results.csv, "
            "results.md (mean ± std) and accuracy-vs-density figures into its folder. Arguments after `--` are "
            "passed to every run (e.g. -- --trainer.max_epochs=3 --data.init_args.data_dir=/data)."
        ),
    )
    parser.add_argument("study", choices=list(STUDIES), help="the study to run")
    parser.add_argument(
        "--out", type=str, default="runs/reproduce", help="parent folder of the study's folder"
    )
    parser.add_argument("--jobs", type=int, default=None, help="runs at once (default: one per GPU, else 1)")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP threads per CPU run (default cores/jobs)"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default: the study's)")
    parser.add_argument("--densities", type=float, nargs="+", default=None, help="densities (default: all)")
    parser.add_argument(
        "--methods", type=str, nargs="+", default=None, help="methods or rules (default: all)"
    )
    parser.add_argument(
        "--print-commands", action="store_true", help="print the commands still to run; run none"
    )
    parser.add_argument("--collect", action="store_true", help="only (re)build the table and figures")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (``sys.argv[1:]`` when ``None``), then run, print commands or collect; return the exit code.

    Returns:
        0 when every run finished (or nothing was run), 1 when some run failed.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    args = _parser().parse_args(argv)
    study = build_study(args.study, densities=args.densities, methods=args.methods, seeds=args.seeds)
    study_dir = Path(args.out) / study.name
    if args.print_commands:
        lines = print_commands(study, study_dir, extra, root=REPO_ROOT)
        sys.stdout.write("".join(f"{line}\n" for line in lines))
        return 0
    if args.collect:
        outputs = write_outputs(study, study_dir, collect(study, study_dir))
        sys.stdout.write("".join(f"{path}\n" for path in outputs))
        return 0
    report = run_study(study, study_dir, jobs=args.jobs, threads=args.threads, extra=extra)
    return 1 if report.failed else 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tensorboard").setLevel(logging.WARNING)  # its event reader logs every file it opens
    sys.exit(main())
