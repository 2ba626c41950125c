"""Helper for tests that run ``ddp_worker.py`` on 2 gloo processes and compare what each rank saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def run_ddp(tmp_path: Path, callback: str, kwargs: dict[str, Any], max_steps: int = 6) -> tuple[dict, dict]:
    """Run the worker and return the two ranks' saved payloads."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path), callback, json.dumps(kwargs), str(max_steps)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    return r0, r1
