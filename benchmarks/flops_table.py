"""Forward-FLOPs table of a model under a random ER mask, as the callbacks log it at fit start (Markdown).

The masks are drawn exactly as ``StaticSparsity`` draws them (default targets, ``layer_densities``, seeded exact
sampling); FLOPs are counted by ``er_lightning.masking.count_flops`` (``torch.utils.flop_counter``) on one input
batch (FLOPs do not depend on the values, so a random batch of the right shape gives the numbers of a real one).

Usage::

    python benchmarks/flops_table.py --model resnet18 --density 0.05 --distribution erk
    python benchmarks/flops_table.py --model small_cnn --density 0.1 --input 1 8 8    # the quickstart
"""

from __future__ import annotations

import argparse  # noqa: TID251 - a benchmark script, not library configuration

import torch

from er_lightning.masking import count_flops, default_targets
from er_lightning.masking.flops import FLOPS_COLUMNS, flops_rows
from er_lightning.models import create_model
from er_lightning.sparsity import layer_densities
from er_lightning.sparsity.sampling import sample_masks


def main() -> None:
    """Print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--num-classes", type=int, default=10)
    parser.add_argument("--density", type=float, default=0.05)
    parser.add_argument("--distribution", default="erk")
    parser.add_argument("--input", type=int, nargs="+", default=[3, 32, 32], help="C H W of one example")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    kwargs = {"in_channels": args.input[0], "input_size": args.input[1]}
    model = create_model(args.model, args.num_classes, **kwargs)
    params = dict(model.named_parameters())
    names = default_targets(model)
    shapes = {n: tuple(params[n].shape) for n in names}
    densities = layer_densities(shapes, args.density, args.distribution)
    masks = sample_masks(shapes, densities, seed=args.seed)
    count = count_flops(model, torch.zeros(1, *args.input), masks)
    print("| " + " | ".join(FLOPS_COLUMNS) + " |")
    print("|" + "|".join(["---"] * 2 + ["---:"] * (len(FLOPS_COLUMNS) - 2)) + "|")
    for row in flops_rows(count, densities):
        bold = row[0] in ("masked tensors", "whole model")
        cells = [f"**{c}**" if bold and c else c for c in row]
        print("| " + " | ".join(cells) + " |")
    print()
    print(
        f"forward FLOPs sparse/dense **{count.inference_ratio:.4f}**; training step 3 f_S / 3 f_D "
        f"**{count.train_step_ratio():.4f}**; a RigL update step (2 f_S + f_D) / 3 f_D "
        f"**{count.train_step_ratio(float(count.dense)):.4f}**"
    )


if __name__ == "__main__":
    main()
