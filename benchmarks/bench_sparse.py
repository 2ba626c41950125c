"""What sparse compute buys: per-layer kernels, training steps and inference, as ratios to dense in one process.

Three tables (``--table layers|train|inference|all``):

* ``layers``: forward + backward (input and weight gradient) of one layer, ``compute="sparse"`` kernels against
  the same dense layer, at CIFAR ResNet-18 shapes and densities 0.1 / 0.05 / 0.01. With ``--sparseprop``,
  SparseProp's modules (``pip install sparseprop``, importable) are timed in the same rounds, best of its two
  conv variants. Every kernel result is also checked against the dense one at batch sizes 1, 7 and 32.
* ``train``: a real ``pl.Trainer`` step (forward, backward, SGD, masks) of VGG-16 ``uniform`` and ResNet-18
  ``erk``, StaticSparsity with ``compute="dense"`` against ``"sparse"`` and ``"auto"``, next to dense training,
  with the forward-FLOPs ratio of the sparse model (the physical limit of this work).
* ``inference``: ``er_lightning.export.to_sparse`` against the dense model in eval mode, batch 32 and 1.

Variants run round-robin (``--reps`` rounds), so drifts of the machine hit all alike; each cell is the median of
its rounds, as a ratio to the dense median of the same rounds.

Usage::

    python benchmarks/bench_sparse.py --threads 2                  # all three tables
    PYTHONPATH=/path/to/sparseprop python benchmarks/bench_sparse.py --table layers --sparseprop
"""

from __future__ import annotations

import argparse  # noqa: TID251 - a benchmark script, not library configuration
import copy
import logging
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from bench_step import (  # the sibling script: same timer and repeated-batch loader
    StepTimer,
    _loader,
    bench_trainer,
)
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from er_lightning import SparseLightningModule, StaticSparsity
from er_lightning.compute import SparseIndex, kernels_available, sparse_conv2d, sparse_linear
from er_lightning.compute.functional import to_batch_last
from er_lightning.export import to_sparse
from er_lightning.models import create_model
from er_lightning.sparsity import layer_densities, sample_masks

LAYERS = [
    ("conv 64x64x3x3 @32x32", 64, 32),
    ("conv 128x128x3x3 @16x16", 128, 16),
    ("conv 256x256x3x3 @8x8", 256, 8),
    ("conv 512x512x3x3 @4x4", 512, 4),
    ("linear 4096x4096", 4096, 0),
]
DENSITIES = (0.1, 0.05, 0.01)
#: the transformer of the train and inference tables: a causal LM of 4 pre-norm blocks (width 256, MLP 1024,
#: 4 heads), an untied 1000-token head, 32 tokens a row (attention projections, MLP and head on the kernels;
#: embeddings and attention scores stay dense)
_LM = dict(seq_len=32, dim=256, depth=4, heads=4, mlp_ratio=4, tie_weights=False)


def _rounds(fns: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds of each function over ``reps`` interleaved rounds (after one warm-up call each).

    Each round runs the functions in a fresh random order (seeded): in a fixed order the variant after dense
    always starts with the caches dense just evicted, which biased short sparse runs by 5-15 %.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    order = list(fns)
    rng = random.Random(0)
    for f in fns.values():
        f()
    for _ in range(reps):
        rng.shuffle(order)
        for k in order:
            start = time.perf_counter()
            fns[k]()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def _fwd_bwd(fn: Callable[[], torch.Tensor], *tensors: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        y = fn()
        y.backward(torch.ones_like(y))
        for t in tensors:
            t.grad = None

    return run


def _masked_layer(kind_c: int, hw: int, density: float, seed: int = 0) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(seed)
    layer = (
        nn.Linear(kind_c, kind_c, bias=False)
        if hw == 0
        else nn.Conv2d(kind_c, kind_c, 3, padding=1, bias=False)
    )
    mask = torch.rand_like(layer.weight) < density
    with torch.no_grad():
        layer.weight.mul_(mask)
    return layer, mask


def _check_layer(layer: nn.Module, mask: torch.Tensor, c: int, hw: int) -> float:
    """Largest relative error of output and gradients against dense, over batch sizes 1, 7 and 32."""
    worst = 0.0
    index = SparseIndex(mask, 1, 1)
    for b in (1, 7, 32):
        x = torch.randn(b, c, hw, hw) if hw else torch.randn(b, c)
        xs, xd = x.clone().requires_grad_(), x.clone().requires_grad_()
        ys = (
            sparse_conv2d(xs, layer.weight, None, index, 1)
            if hw
            else sparse_linear(xs, layer.weight, None, index)
        )
        yd = layer(xd)
        g = torch.randn_like(yd)
        gs = torch.autograd.grad(ys, [xs, layer.weight], g)
        gd = torch.autograd.grad(yd, [xd, layer.weight], g)
        for a, r in ((ys, yd), (gs[0], gd[0]), (gs[1], gd[1] * mask)):
            worst = max(worst, float((a - r).abs().max() / r.abs().max().clamp_min(1e-12)))
    return worst


def table_layers(args: argparse.Namespace) -> None:
    sp = None
    if args.sparseprop:
        import sparseprop.modules as sp  # noqa: PLC0415 - optional comparison
    print(
        f"\n### Per layer: forward + backward, batch {args.batch_size}, ratio to dense (median of {args.reps})\n"
    )
    in_plan: dict[str, list[str]] = {}
    cols = " | ".join(f"d={d}" + (" (SparseProp)" if sp else "") for d in DENSITIES)
    print(f"| layer | {cols} | max rel. error (batch 1/7/32) |")
    print("|---|" + "---:|" * len(DENSITIES) + "---:|")
    for label, c, hw in LAYERS:
        cells, worst = [], 0.0
        for d in DENSITIES:
            layer, mask = _masked_layer(c, hw, d)
            worst = max(worst, _check_layer(layer, mask, c, hw))
            index = SparseIndex(mask, 1, 1)
            b = args.batch_size
            x = (torch.randn(b, c, hw, hw) if hw else torch.randn(b, c)).requires_grad_()
            fns = {"dense": _fwd_bwd(lambda: layer(x), x, layer.weight)}
            if hw:
                fns["ours"] = _fwd_bwd(
                    lambda: sparse_conv2d(x, layer.weight, None, index, 1), x, layer.weight
                )
                # as the training layout plan runs it: batch-last input, result and input gradient
                xb = to_batch_last(x.detach()).requires_grad_()
                fns["ours_bl"] = _fwd_bwd(
                    lambda: sparse_conv2d(xb, layer.weight, None, index, 1, batch_last=True), xb, layer.weight
                )
            else:
                fns["ours"] = _fwd_bwd(lambda: sparse_linear(x, layer.weight, None, index), x, layer.weight)
            theirs = []
            if sp is not None:
                if hw:
                    for over_on in (False, True):
                        m = sp.SparseConv2d(
                            layer.weight.detach().clone(), padding=1, stride=1, vectorizing_over_on=over_on
                        )
                        theirs.append(m)
                else:
                    theirs.append(sp.SparseLinear(layer.weight.detach().clone()))
                for i, m in enumerate(theirs):
                    fns[f"sp{i}"] = _fwd_bwd(lambda m=m: m(x), x, *m.parameters())
            if args.pairwise:  # each variant in rounds with dense alone: no third kernel between them
                ratio = {}
                for k in fns:
                    if k != "dense":
                        t = _rounds({"dense": fns["dense"], k: fns[k]}, args.reps)
                        ratio[k] = t[k] / t["dense"]
            else:
                t = _rounds(fns, args.reps)
                ratio = {k: v / t["dense"] for k, v in t.items() if k != "dense"}
            cell = f"{ratio['ours']:.2f}×"
            if theirs:
                cell += f" ({min(ratio[f'sp{i}'] for i in range(len(theirs))):.2f}×)"
            cells.append(cell)
            if "ours_bl" in ratio:
                in_plan.setdefault(label, []).append(f"{ratio['ours_bl']:.2f}×")
        print(f"| {label} | " + " | ".join(cells) + f" | {worst:.1e} |", flush=True)
    print(
        "\nThe same convolutions in the training layout plan's layout (batch-last input, result and input gradient):\n"
    )
    print("| layer | " + " | ".join(f"d={d}" for d in DENSITIES) + " |")
    print("|---|" + "---:|" * len(DENSITIES))
    for label, cells in in_plan.items():
        print(f"| {label} | " + " | ".join(cells) + " |")


def _flops_ratio(model: nn.Module, masks: dict[str, torch.Tensor], x: torch.Tensor) -> float:
    """Forward FLOPs of the sparse model over the dense one: conv/linear FLOPs scale with their density."""
    density_by_module = {n.rpartition(".")[0]: float(m.float().mean()) for n, m in masks.items()}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    model.train()
    counts = counter.get_flop_counts()
    total = sum(counts.get("Global", {}).values())
    leaf = {}
    for name, ops in counts.items():
        if name == "Global":
            continue
        # the counter names modules by their path from the root; keep the deepest (leaf) entries
        leaf[name] = sum(ops.values())
    sparse = total
    for name, flops in leaf.items():
        key = name.split(".", 1)[1] if "." in name else name
        if key in density_by_module and not any(k.startswith(name + ".") for k in leaf):
            sparse -= flops * (1 - density_by_module[key])
    return sparse / total


def table_train(args: argparse.Namespace) -> None:
    print(f"\n### Training step (pl.Trainer, SGD, batch {args.batch_size}), ratio to dense training\n")
    print(
        "| model | rule | density | masked dense | sparse | auto | FLOPs ratio | index rebuild (of a dense step) |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch_size, 3, 32, 32, generator=gen), torch.randint(0, 10, (args.batch_size,))
    tokens = torch.randint(0, 1000, (args.batch_size, 33), generator=gen)
    for model, rule, classes, kwargs, (x, y) in (
        ("vgg16", "uniform", 10, None, images),
        ("resnet18", "erk", 10, None, images),
        ("transformer_lm", "erk", 1000, _LM, (tokens[:, :-1], tokens[:, 1:])),
    ):
        if args.models and model not in args.models:
            continue
        for d in (0.05, 0.01):
            torch.manual_seed(0)
            base = SparseLightningModule(
                model,
                num_classes=classes,
                model_kwargs=kwargs,
                optimizer="sgd",
                lr=0.01,
                momentum=0.9,
                lr_schedule="constant",
            )
            variants = {
                "dense": [],
                "masked dense": [StaticSparsity(density=d, distribution=rule)],
                "sparse": [StaticSparsity(density=d, distribution=rule, compute="sparse")],
                "auto": [StaticSparsity(density=d, distribution=rule, compute="auto")],
            }
            mods = {k: copy.deepcopy(base) for k in variants}
            timers = {k: StepTimer(torch.device("cpu")) for k in variants}
            order, rng = list(variants), random.Random(0)
            for _ in range(args.reps):
                rng.shuffle(order)  # a fixed order would always start "auto" on the caches "sparse" left warm
                for k in order:
                    trainer = bench_trainer("cpu", args.steps, [*variants[k], timers[k]])
                    trainer.fit(mods[k], _loader(x, y, args.steps))
            med = {}
            for k, t in timers.items():
                kept = [
                    s for r in range(args.reps) for s in t.times[r * args.steps + 2 : (r + 1) * args.steps]
                ]
                med[k] = statistics.median(kept)
            masks = variants["sparse"][0].masked.masks
            ratio = _flops_ratio(mods["sparse"], masks, x[:2])
            # what a DST update adds under sparse compute: rebuilding every layer's index from its new mask
            start = time.perf_counter()
            for m in masks.values():
                SparseIndex(m)
            rebuild = time.perf_counter() - start
            print(
                f"| {model} | {rule} | {d} | {med['masked dense'] / med['dense']:.2f}× | "
                f"{med['sparse'] / med['dense']:.2f}× | {med['auto'] / med['dense']:.2f}× | {ratio:.3f} | "
                f"{rebuild * 1e3:.0f} ms ({rebuild / med['dense']:.2f}) |  <!-- dense {med['dense'] * 1e3:.0f} ms/step -->",
                flush=True,
            )


def _random_sparse(model: nn.Module, rule: str, d: float) -> dict[str, torch.Tensor]:
    names = [n for n, p in model.named_parameters() if p.dim() in (2, 4)]
    params = dict(model.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in names}
    masks = sample_masks(shapes, layer_densities(shapes, d, rule), seed=0)
    with torch.no_grad():
        for n, m in masks.items():
            params[n].mul_(m)
    return masks


def table_inference(args: argparse.Namespace) -> None:
    print(
        f"\n### Inference: to_sparse against the dense model (eval, no_grad), speed-up (median of {args.reps})\n"
    )
    print("| model | rule | density | batch 32 | batch 1 | max rel. error |")
    print("|---|---|---:|---:|---:|---:|")
    rows = (
        ("vgg16", "uniform", 10, {}, lambda b: torch.randn(b, 3, 32, 32)),
        ("resnet18", "erk", 10, {}, lambda b: torch.randn(b, 3, 32, 32)),
        ("transformer_lm", "erk", 1000, _LM, lambda b: torch.randint(0, 1000, (b, 32))),
    )
    for model_name, rule, classes, kwargs, make_input in rows:
        if args.models and model_name not in args.models:
            continue
        for d in (0.05, 0.01):
            torch.manual_seed(0)
            model = create_model(model_name, num_classes=classes, **kwargs).eval()
            _random_sparse(model, rule, d)
            cells, err = [], 0.0
            for b in (32, 1):
                x = make_input(b)
                fast = to_sparse(model, example_input=x)  # per layer: sparse only where it is faster here
                with torch.no_grad():
                    ref = model(x)
                    err = max(err, float((fast(x) - ref).abs().max() / ref.abs().max()))

                    def dense(x=x):  # noqa: ANN001, ANN202
                        with torch.no_grad():
                            return model(x)

                    def sparse(x=x, fast=fast):  # noqa: ANN001, ANN202
                        with torch.no_grad():
                            return fast(x)

                t = _rounds({"dense": dense, "sparse": sparse}, args.reps * (4 if b == 1 else 1))
                cells.append(f"{t['dense'] / t['sparse']:.2f}× ({t['sparse'] * 1e3:.1f} ms)")
            print(f"| {model_name} | {rule} | {d} | " + " | ".join(cells) + f" | {err:.1e} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--table", default="all", choices=["layers", "train", "inference", "all"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds per cell")
    parser.add_argument("--steps", type=int, default=6, help="training steps per round (first 2 dropped)")
    parser.add_argument(
        "--pairwise",
        action="store_true",
        help="layers table: time each kernel in rounds with dense alone (as SparseProp's figures in issue 13 "
        "were taken) instead of all variants in the same rounds",
    )
    parser.add_argument(
        "--sparseprop", action="store_true", help="also time SparseProp's modules (layers table)"
    )
    parser.add_argument(
        "--models", nargs="+", help="train and inference tables: only these (vgg16, resnet18, transformer_lm)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("er_lightning").setLevel(logging.ERROR)
    if not kernels_available():
        raise SystemExit(
            "the sparse kernels are not available on this machine (see er_lightning.compute.build_error())"
        )
    print(
        f"threads={args.threads} torch={torch.__version__} cpu={platform.processor() or platform.machine()}"
    )
    if args.table in ("layers", "all"):
        table_layers(args)
    if args.table in ("train", "all"):
        table_train(args)
    if args.table in ("inference", "all"):
        table_inference(args)


if __name__ == "__main__":
    main()
