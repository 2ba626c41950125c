from __future__ import annotations

import math

import pytest
import torch
from conftest import PlainModule
from ddp_helpers import run_ddp

from er_lightning.callbacks.base import _stream_seed
from er_lightning.callbacks.supermask import _SCORE_STREAM
from er_lightning.masking.supermask import init_scores
from er_lightning.sparsity.anneal import annealed_densities
from er_lightning.sparsity.sampling import layer_generator

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]


def _key(name: str, what: str) -> str:
    module = name.rpartition(".")[0]
    return f"{module}.parametrizations.weight.{what}"


@pytest.mark.dist
def test_supermask_masks_scores_and_frozen_weights_agree_on_two_ranks(tmp_path):
    kwargs = {
        "density": 0.2,
        "er_density": 0.5,
        "levels": 2,
        "seed": 3,
        "weight_init": "default",  # W comes from each rank's own (differently seeded) model init
        "verify_masks": True,
        "restart_lr_each_level": False,
    }
    r0, r1 = run_ddp(tmp_path, "er_lightning.callbacks.supermask.Supermask", kwargs, max_steps=6)
    assert r0["global_step"] == r1["global_step"] == 6
    c0, c1 = r0["callback"], r1["callback"]
    assert list(c0["masks"]) == NAMES
    assert c0["level"] == c1["level"] == 1
    assert c0["k"] == c1["k"] == annealed_densities(0.2, 0.5, levels=2)[1] == 0.2
    # rank 0 seeds its model with 1000 (ddp_worker); DDP broadcasts rank 0's frozen weights at wrap time
    torch.manual_seed(1000)
    rank0_init = dict(PlainModule().named_parameters())
    for index, name in enumerate(NAMES):
        mask = c0["masks"][name]
        assert torch.equal(mask, c1["masks"][name]), name
        w0, w1 = r0["model"][_key(name, "original")], r1["model"][_key(name, "original")]
        assert torch.equal(w0, w1), name
        assert torch.equal(w0, rank0_init[name].detach() * mask), name  # never trained, zero outside M_ER
        s0, s1 = r0["model"][_key(name, "0.scores")], r1["model"][_key(name, "0.scores")]
        assert torch.equal(s0, s1), name  # gradients were all-reduced
        start = init_scores(
            s0.shape,
            "kaiming_uniform",
            generator=layer_generator(_stream_seed(3, _SCORE_STREAM), index),
            fan=math.prod(s0.shape[1:]),
        )
        assert not torch.equal(s0, start), name  # the scores did train
