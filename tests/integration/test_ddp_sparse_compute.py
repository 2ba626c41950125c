from __future__ import annotations

import pytest
import torch
from ddp_helpers import run_ddp

from er_lightning.compute import kernels_available


@pytest.mark.dist
@pytest.mark.skipif(not kernels_available(), reason="sparse kernels unavailable")
@pytest.mark.parametrize(
    ("callback", "kwargs"),
    [
        ("StaticSparsity", {"density": 0.2, "distribution": "erk", "seed": 5, "compute": "sparse"}),
        (
            "RigL",
            {"density": 0.2, "update_every_steps": 2, "seed": 5, "compute": "sparse", "verify_masks": True},
        ),
    ],
)
def test_sparse_compute_keeps_ranks_identical(tmp_path, callback, kwargs):
    """Gradients from the sparse kernels go through DDP's all-reduce like dense ones: same masks and weights."""
    r0, r1 = run_ddp(tmp_path, callback, kwargs, max_steps=5)
    assert r0["global_step"] == r1["global_step"] == 5
    m0, m1 = r0["callback"]["masks"], r1["callback"]["masks"]
    for name in m0:
        assert torch.equal(m0[name], m1[name]), name
        assert int((r0["model"][name][~m0[name]] != 0).sum()) == 0
    params = [
        n for n in r0["model"] if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    for name in params:
        assert torch.equal(r0["model"][name], r1["model"][name]), name
