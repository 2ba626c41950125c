"""Run a short DDP fit on 2 CPU processes (gloo) and save each rank's masks and weights.

Usage: python ddp_worker.py OUT_DIR CALLBACK JSON_KWARGS [MAX_STEPS]

CALLBACK is a class name exported by ``er_lightning.callbacks`` or a dotted path ``package.module.Class``.
JSON_KWARGS may hold ``_optimizer`` (sgd | adam | adamw | rmsprop) for the model; the rest goes to the callback.

Lightning's ``ddp`` strategy re-launches this script for rank 1, so it must be a file, not a pytest function.
Each rank writes ``OUT_DIR/rank{r}.pt`` with the callback's state (masks) and the model's state_dict, for tests that
assert identical masks and weights on every rank (tests/integration/test_ddp.py and the DST/supermask/STR tests).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import importlib  # noqa: E402

from conftest import PlainModule, random_loader  # noqa: E402

import er_lightning.callbacks as callbacks  # noqa: E402


def _resolve(name: str) -> type:
    if "." in name:
        module, _, cls = name.rpartition(".")
        return getattr(importlib.import_module(module), cls)
    return getattr(callbacks, name)


def main() -> None:
    out = Path(sys.argv[1])
    cls = _resolve(sys.argv[2])
    kwargs = json.loads(sys.argv[3])
    max_steps = int(sys.argv[4]) if len(sys.argv) > 4 else 6
    torch.set_num_threads(1)
    # Different global seeds per rank on purpose: masks must agree through seeded generators and broadcast,
    # not through a shared global RNG state.
    rank = int(__import__("os").environ.get("LOCAL_RANK", 0))
    torch.manual_seed(1000 + rank)
    module = PlainModule(optimizer=kwargs.pop("_optimizer", "sgd"), lr=0.05)
    cb = cls(**kwargs)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
    )
    # each rank sees different data through the DistributedSampler
    trainer.fit(module, random_loader(n=128, batch_size=8))
    out.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "callback": cb.state_dict(),
            "model": {k: v.detach().clone() for k, v in module.state_dict().items()},
            "global_step": trainer.global_step,
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
