"""The examples in the sparse-compute docstrings run and print what they claim."""

from __future__ import annotations

import doctest

import pytest
import torch
from torch import nn

import er_lightning.compute.attention
import er_lightning.compute.functional
import er_lightning.export
import er_lightning.masking.compute
from er_lightning.compute import kernels_available

pytestmark = pytest.mark.skipif(not kernels_available(), reason="sparse kernels unavailable")


@pytest.mark.parametrize(
    "module",
    [
        er_lightning.compute.attention,
        er_lightning.compute.functional,
        er_lightning.export,
        er_lightning.masking.compute,
    ],
)
def test_docstring_examples_run(module):
    globs = {"torch": torch, "nn": nn, "F": nn.functional}
    result = doctest.testmod(module, extraglobs=globs, verbose=False)
    assert result.attempted > 0
    assert result.failed == 0
