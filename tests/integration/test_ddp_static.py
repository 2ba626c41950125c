from __future__ import annotations

import pytest
import torch
from ddp_helpers import run_ddp


@pytest.mark.dist
def test_static_masks_and_weights_identical_on_two_ranks(tmp_path):
    r0, r1 = run_ddp(
        tmp_path,
        "StaticSparsity",
        {"density": 0.2, "distribution": "erk", "seed": 5, "verify_masks": True},
        max_steps=4,
    )
    assert r0["global_step"] == r1["global_step"] == 4
    m0, m1 = r0["callback"]["masks"], r1["callback"]["masks"]
    assert list(m0) == ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]
    for name in m0:
        assert torch.equal(m0[name], m1[name]), name
    # parameters agree (BN running statistics are per rank without sync BN, so they are not compared)
    params = [
        n for n in r0["model"] if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    assert len(params) == 8
    for name in params:
        assert torch.equal(r0["model"][name], r1["model"][name]), name
    for name, mask in m0.items():
        assert (r0["model"][name][~mask] == 0).all()
        assert (r0["model"][name][mask] != 0).all()


@pytest.mark.dist
def test_verify_masks_raises_when_ranks_disagree(tmp_path):
    import json
    import os
    import subprocess
    import sys

    from ddp_helpers import WORKER

    kwargs = {"density": 0.2, "verify_masks": True}
    proc = subprocess.run(
        [
            sys.executable,
            str(WORKER),
            str(tmp_path),
            "corrupting.CorruptingStaticSparsity",
            json.dumps(kwargs),
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(WORKER.parent)),
        cwd=str(tmp_path),
    )
    assert proc.returncode != 0
    assert "masks differ between rank 0 and rank 1 for 'net.conv1.weight'" in proc.stdout + proc.stderr
