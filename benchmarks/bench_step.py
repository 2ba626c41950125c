"""The cost of sparsity against dense training, measured side by side in one process.

Every variant trains the same model architecture (same init, same batch, same optimizer) through a real
``pl.Trainer``; a timing callback records each optimizer step (forward, backward, our hooks, the step). Variants are
run round-robin in short bursts (``--rounds`` × ``--steps``), so slow drifts of the machine hit all of them alike,
and the report gives the median ms/step and the ratio to the dense median of the same run.

Dynamic methods (RigL, GraNet) are timed on their non-update steps and, separately, on update steps (forced every
few steps); the amortised cost for an update period f is ``(median_step · (f − 1) + median_update_step) / f``.
The cost of one mask update alone is the time spent inside the callback's ``update_masks`` hook.

Usage::

    python benchmarks/bench_step.py --model resnet18 --batch-size 32 --threads 2
    python benchmarks/bench_step.py --model vgg16 --device cuda --batch-size 128
    python benchmarks/bench_step.py --update-cost --model resnet50   # one RigL/GraNet update vs one step
"""

from __future__ import annotations

import argparse  # noqa: TID251 - a benchmark script, not library configuration
import copy
import importlib
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from er_lightning import SparseLightningModule
from er_lightning.callbacks import StaticSparsity


class _RepeatBatch(Dataset):
    """The same batch over and over (no data loading in the measurement)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, length: int) -> None:
        self.x, self.y, self.length = x, y, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x, self.y


def _loader(x: torch.Tensor, y: torch.Tensor, steps: int) -> DataLoader:
    return DataLoader(_RepeatBatch(x, y, steps), batch_size=None, shuffle=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Wall time of every training step, and whether the sparsity callback updated masks in it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: list[float] = []
        self.update_flags: list[bool] = []
        self._t0 = 0.0
        self.update_seconds: list[float] = []
        self._updated = False

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        _sync(self.device)
        self._updated = False
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        _sync(self.device)
        self.times.append(time.perf_counter() - self._t0)
        self.update_flags.append(self._updated)

    def wrap_update(self, cb: Callback) -> None:
        """Time the callback's ``update_masks`` hook and flag steps whose masks changed."""
        if not hasattr(cb, "update_masks"):
            return
        inner: Callable[..., Any] = cb.update_masks

        def timed(
            trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
        ) -> Any:
            _sync(self.device)
            t0 = time.perf_counter()
            counts_before = cb.masked.state_masks() if _is_update_step(cb, trainer) else None
            out = inner(trainer, pl_module, optimizer)
            _sync(self.device)
            dt = time.perf_counter() - t0
            if counts_before is not None:
                self._updated = True
                self.update_seconds.append(dt)
            return out

        cb.update_masks = timed  # type: ignore[method-assign]


def _is_update_step(cb: Callback, trainer: pl.Trainer) -> bool:
    probe = getattr(cb, "is_update_step", None)
    if callable(probe):
        return bool(probe(trainer.global_step))
    every = getattr(cb, "update_every_steps", None)
    return bool(every) and trainer.global_step > 0 and trainer.global_step % every == 0


@dataclass
class Variant:
    name: str
    make_callbacks: Callable[[], list[Callback]]
    update_every: int | None = None  # amortise update steps over this period in the report
    module: SparseLightningModule | None = None
    timer: StepTimer | None = None
    callbacks: list[Callback] = field(default_factory=list)
    peak_bytes: int = 0


def bench_trainer(
    accelerator: str, steps: int, callbacks: list[Callback], precision: str = "32-true"
) -> pl.Trainer:
    """A Trainer that only trains: no logger, checkpoints, progress bar, summary or validation."""
    return pl.Trainer(
        accelerator=accelerator,
        devices=1,
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        precision=precision,
        callbacks=callbacks,
    )


def _try_callback(path: str) -> type | None:
    module, _, cls = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError):
        return None


def build_variants(args: argparse.Namespace, dynamic_only: bool = False) -> list[Variant]:
    d = args.density
    variants = [
        Variant("dense", lambda: []),
        Variant("StaticSparsity", lambda: [StaticSparsity(density=d, distribution="erk")]),
    ]
    periods = (100,) if dynamic_only else (100, 1000)
    rigl = _try_callback("er_lightning.callbacks.RigL")
    granet = _try_callback("er_lightning.callbacks.GraNet")
    supermask = _try_callback("er_lightning.callbacks.Supermask")
    soft = _try_callback("er_lightning.callbacks.SoftThreshold")
    probe = args.update_probe_every
    if rigl is not None:
        for f in periods:
            variants.append(
                Variant(
                    f"RigL f={f}", lambda: [rigl(density=d, update_every_steps=probe, stop_updates_at=1.0)], f
                )
            )
        variants.append(
            Variant(
                "RigL-momentum f=100",
                lambda: [rigl(density=d, update_every_steps=probe, stop_updates_at=1.0, growth="momentum")],
                100,
            )
        )
    if granet is not None:
        for f in periods:
            variants.append(
                Variant(
                    f"GraNet f={f}",
                    lambda: [granet(init_density=min(1.0, 2 * d), final_density=d, update_every_steps=probe)],
                    f,
                )
            )
    if dynamic_only:
        return [v for v in variants if v.update_every]
    if supermask is not None:
        variants.append(Variant("Supermask", lambda: [supermask(density=d / 2, er_density=d)]))
    if soft is not None:
        variants.append(Variant("SoftThreshold", lambda: [soft(density=d)]))
    return variants


def run(args: argparse.Namespace, dynamic_only: bool = False) -> list[dict[str, Any]]:
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    num_classes = 100 if args.model == "resnet50" else 10
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch_size, 3, 32, 32, generator=gen)
    y = torch.randint(0, num_classes, (args.batch_size,), generator=gen)
    torch.manual_seed(0)
    base = SparseLightningModule(
        args.model, num_classes=num_classes, optimizer="sgd", lr=0.01, momentum=0.9, lr_schedule="constant"
    )
    variants = build_variants(args, dynamic_only)
    if args.only:
        wanted = {w.strip() for w in args.only.split(",")} | {"dense"}
        variants = [v for v in variants if v.name.split()[0] in wanted]
    for v in variants:
        v.module = copy.deepcopy(base)
        v.callbacks = v.make_callbacks()
        v.timer = StepTimer(device)
        for cb in v.callbacks:
            v.timer.wrap_update(cb)
    # One Trainer per variant and round; the module keeps its weights and the callbacks their masks, because setup
    # is idempotent for the same module.
    for _ in range(args.rounds):
        for v in variants:
            assert v.module is not None and v.timer is not None
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            trainer = bench_trainer(accelerator, args.steps, [*v.callbacks, v.timer], args.precision)
            trainer.fit(v.module, _loader(x, y, args.steps))
            if device.type == "cuda":
                v.peak_bytes = max(v.peak_bytes, torch.cuda.max_memory_allocated(device))
    dense_median = None
    rows = []
    for v in variants:
        assert v.timer is not None
        warm = args.warmup
        # drop the first steps of each burst (allocator and thread-pool warm-up)
        times, flags = [], []
        for r in range(args.rounds):
            times += v.timer.times[r * args.steps + warm : (r + 1) * args.steps]
            flags += v.timer.update_flags[r * args.steps + warm : (r + 1) * args.steps]
        plain = [t for t, f in zip(times, flags) if not f]
        updates = [t for t, f in zip(times, flags) if f]
        med = statistics.median(plain) * 1e3
        if v.name == "dense":
            dense_median = med
        row: dict[str, Any] = {"variant": v.name, "ms_step": med, "n": len(plain)}
        if v.update_every and updates:
            upd = statistics.median(updates) * 1e3
            row["ms_update_step"] = upd
            row["ms_update_only"] = statistics.median(v.timer.update_seconds) * 1e3
            row["ms_amortised"] = (med * (v.update_every - 1) + upd) / v.update_every
        mask_bytes = 0
        masked_weights = 0
        for cb in v.callbacks:
            masked = getattr(cb, "masked", None)
            if masked is not None:
                for m in masked.masks.values():
                    mask_bytes += m.numel() * m.element_size()
                    masked_weights += m.numel()
        row["mask_bytes_per_weight"] = mask_bytes / masked_weights if masked_weights else None
        row["ms_mask_op"] = _time_mask_op(v.callbacks, device)
        row["ms_momentum_op"] = _time_momentum_op(v.callbacks, device)
        row["peak_mib"] = v.peak_bytes / 2**20 if v.peak_bytes else None
        rows.append(row)
    for row in rows:
        ref = row.get("ms_amortised", row["ms_step"])
        row["ratio"] = ref / dense_median if dense_median else float("nan")
    return rows


def _time_momentum_op(callbacks: list[Callback], device: torch.device, repeats: int = 20) -> float | None:
    """Median ms of momentum growth's per-step op (one fused lerp of the dense-gradient average), timed alone."""
    for cb in callbacks:
        bufs = getattr(cb, "grad_momentum", None)
        masked = getattr(cb, "masked", None)
        if bufs is None or masked is None:
            continue
        work = [b.clone() for b in bufs.values()]
        grads = [p.detach().clone() for p in masked.params]  # stand-ins for the dense gradients
        times = []
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            torch._foreach_lerp_(work, grads, 0.1)
            _sync(device)
            times.append(time.perf_counter() - t0)
        return statistics.median(times) * 1e3
    return None


def _time_mask_op(callbacks: list[Callback], device: torch.device, repeats: int = 20) -> float | None:
    """Median ms of the per-step engine op (one fused multiply over every masked tensor), timed alone.

    ``apply_`` runs the same ``_foreach_mul_`` over the weights that ``mask_grads_`` runs over the gradients each
    step; timed in isolation it is a low-noise estimate of what a hard mask adds to a step.
    """
    masked = next((cb.masked for cb in callbacks if getattr(cb, "masked", None) is not None), None)
    if masked is None:
        return None
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        masked.apply_()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def update_cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    """One mask update against one training step, for RigL and GraNet (ResNet-50 by default)."""
    args = copy.copy(args)
    args.rounds = 1
    args.update_probe_every = 5
    rows = [r for r in run(args, dynamic_only=True) if "ms_update_only" in r]
    for r in rows:
        r["update_vs_step"] = r["ms_update_only"] / r["ms_step"]
    return rows


def _fmt(v: Any, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="resnet18", choices=["resnet18", "vgg16", "resnet50", "resnet20"])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12, help="steps per burst")
    parser.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each burst")
    parser.add_argument(
        "--update-probe-every", type=int, default=4, help="update period used to time update steps"
    )
    parser.add_argument(
        "--update-cost", action="store_true", help="time one RigL/GraNet update against one step"
    )
    parser.add_argument(
        "--only", default="", help="comma-separated variants to run besides dense (e.g. RigL,Supermask)"
    )
    args = parser.parse_args()
    pl.seed_everything(0, verbose=False)
    warnings.filterwarnings("ignore")

    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("er_lightning").setLevel(logging.ERROR)
    header = (
        f"model={args.model} batch={args.batch_size} threads={args.threads} device={args.device} "
        f"precision={args.precision} density={args.density} torch={torch.__version__} "
        f"cpu={platform.processor() or platform.machine()}"
    )
    print(header)
    if args.update_cost:
        print("| variant | ms/step | ms one update | update / step |")
        print("|---|---:|---:|---:|")
        for r in update_cost(args):
            print(
                f"| {r['variant'].split()[0]} | {r['ms_step']:.1f} | {r['ms_update_only']:.1f} | {r['update_vs_step']:.2f} |"
            )
        return
    rows = run(args)
    print(
        "| variant | ms/step (median) | amortised ms/step | ratio to dense | mask op ms (% of dense step) "
        "| mask bytes/weight | peak MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    dense = rows[0]["ms_step"]
    for r in rows:
        if r.get("ms_momentum_op") is not None:
            print(f"# {r['variant']}: dense-gradient momentum lerp alone {r['ms_momentum_op']:.2f} ms/step")
    for r in rows:
        op = r["ms_mask_op"]
        op_txt = "–" if op is None else f"{op:.1f} ({100 * op / dense:.1f} %)"
        print(
            f"| {r['variant']} | {r['ms_step']:.1f} | {_fmt(r.get('ms_amortised'))} | {r['ratio']:.3f} | {op_txt} "
            f"| {_fmt(r['mask_bytes_per_weight'], '.0f')} | {_fmt(r['peak_mib'], '.0f')} |"
        )


if __name__ == "__main__":
    main()
