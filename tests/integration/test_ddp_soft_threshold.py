from __future__ import annotations

import pytest
import torch
from ddp_helpers import run_ddp

from er_lightning.masking.soft_threshold import soft_threshold

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]


def _key(name: str, what: str) -> str:
    mod = name.rpartition(".")[0]
    return (
        f"{mod}.parametrizations.weight.original"
        if what == "w"
        else f"{mod}.parametrizations.weight.0.threshold"
    )


@pytest.mark.dist
def test_soft_threshold_masks_and_thresholds_identical_on_two_ranks(tmp_path):
    # Each rank starts from a different global seed and sees different data; per-channel thresholds learn from the
    # loss (s_init = -2.5 gives g'(s) > 0) and DDP must keep them in sync. The controller runs at the end of the run
    # (max_steps stops mid-epoch; Lightning still calls on_train_epoch_end) and must shift both ranks alike.
    r0, r1 = run_ddp(
        tmp_path,
        "er_lightning.callbacks.soft_threshold.SoftThreshold",
        {
            "density": 0.4,
            "distribution": "erk",
            "seed": 5,
            "s_init": -2.5,
            "per_channel": True,
            "verify_masks": True,
            "target_density": 0.25,
        },
        max_steps=4,
    )
    assert r0["global_step"] == r1["global_step"] == 4
    m0, m1 = r0["callback"]["masks"], r1["callback"]["masks"]
    assert list(m0) == NAMES
    for name in NAMES:
        assert torch.equal(m0[name], m1[name]), name
    assert (
        r0["callback"]["soft_threshold"]["start_density"] == r1["callback"]["soft_threshold"]["start_density"]
    )
    params = [
        n for n in r0["model"] if not n.endswith(("running_mean", "running_var", "num_batches_tracked"))
    ]
    assert len(params) == 11  # 3 originals + 3 thresholds + 2 BN affine pairs + fc bias
    for name in params:
        assert torch.equal(r0["model"][name], r1["model"][name]), name
    kept = total = 0
    for name, mask in m0.items():
        w, s = r0["model"][_key(name, "w")], r0["model"][_key(name, "s")]
        assert s.shape[0] == w.shape[0]
        assert not torch.equal(s, torch.full_like(s, -2.5)), name  # thresholds were trained (and shifted)
        w_hat = soft_threshold(w, s)
        assert (w[~mask] == 0).all() and (w_hat[~mask] == 0).all(), name
        kept += int((w_hat != 0).sum())
        total += w.numel()
    assert kept / total == pytest.approx(0.25, abs=2 / total)
