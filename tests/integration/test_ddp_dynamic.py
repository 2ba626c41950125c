from __future__ import annotations

import pytest
import torch
from conftest import PlainModule
from ddp_helpers import run_ddp

from er_lightning.sparsity import layer_densities, sample_masks

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]


@pytest.mark.dist
@pytest.mark.parametrize("method", ["SET", "RigL"])
def test_dst_masks_identical_on_two_ranks_and_counts_conserved(tmp_path, method):
    kwargs = {
        "density": 0.3,
        "distribution": "uniform",
        "seed": 5,
        "update_every_steps": 2,
        "stop_updates_at": 1.0,
        "verify_masks": True,
    }
    r0, r1 = run_ddp(tmp_path, f"er_lightning.callbacks.dynamic.{method}", kwargs, max_steps=6)
    assert r0["global_step"] == r1["global_step"] == 6  # updates at steps 2 and 4
    m0, m1 = r0["callback"]["masks"], r1["callback"]["masks"]
    assert list(m0) == NAMES
    shapes = {n: tuple(p.shape) for n, p in PlainModule().named_parameters() if n in NAMES}
    initial = sample_masks(shapes, layer_densities(shapes, 0.3, "uniform"), seed=5)
    changed = 0
    for name in NAMES:
        assert torch.equal(m0[name], m1[name]), name
        assert torch.equal(r0["callback"]["ever_active"][name], r1["callback"]["ever_active"][name]), name
        assert int(m0[name].sum()) == int(initial[name].sum()), name  # per-layer count conserved
        changed += int((m0[name] & ~initial[name]).sum())
        # weights agree on both ranks and are zero exactly off the mask
        assert torch.equal(r0["model"][name], r1["model"][name]), name
        assert (r0["model"][name][~m0[name]] == 0).all()
    assert changed > 0, "the updates must have moved some connections"
