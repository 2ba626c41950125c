"""The README's Python examples construct what they say (arguments exist and validate)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_examples_for_every_method():
    text = "\n".join(_python_blocks())
    for name in (
        "StaticSparsity(",
        "IterativeMagnitudePruning(",
        "RigL(",
        "GraNet(",
        "Supermask(",
        "SoftThreshold(",
    ):
        assert name in text, name


@pytest.mark.parametrize("index", range(len(_python_blocks())))
def test_readme_python_block_runs_up_to_fit(index, tmp_path, monkeypatch):
    """Execute each block with `fit` replaced by a no-op and placeholder names defined."""
    import pytorch_lightning as pl

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(pl.Trainer, "fit", lambda self, *a, **k: None)
    block = _python_blocks()[index]
    if "plain = slt.bake(module)" in block:
        block = block.replace("plain = slt.bake(module)", "")  # needs a trained, set-up module
    namespace = {"pl": pl, "my_lightning_module": None, "dm": None}
    exec(compile(block, f"README block {index}", "exec"), namespace)  # noqa: S102
