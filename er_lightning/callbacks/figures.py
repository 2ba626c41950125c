"""TensorBoard figures of the sparse network: matplotlib figures through ``SummaryWriter.add_figure``.

The drawing functions take plain numbers and return a :class:`matplotlib.figure.Figure` (no pyplot state), so
they are tested without a logger. :class:`FigureWriter` keeps the little history the figures need (per-layer
densities at every mask change, for the heat map) and writes to every
:class:`~pytorch_lightning.loggers.TensorBoardLogger` of the trainer; other loggers are skipped.

=================================  ==============================================  ===============================
tag                                what                                            when
=================================  ==============================================  ===============================
``sparsity/layer_densities``       density per layer (bars), target marked         every mask change
``sparsity/density_heatmap``       density per layer at every mask change          epoch ends (DST, GMP, STR)
                                   (layers × steps)
``sparsity/dead_units``            share of output / input units with no active    epoch ends (DST, GMP, STR)
                                   connection, per layer
``dst/itop_overlap``               per layer: share of weights ever active (ITOP)  epoch ends (DST, GMP)
                                   and share of the initial mask still active
``weights/<fqn>`` (histogram)      ``|w|`` of the active weights                   epoch ends
``masks/<fqn>`` (image)            the mask, out × (in·kernel), white = active     epoch ends, small layers
=================================  ==============================================  ===============================
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from matplotlib.figure import Figure
from pytorch_lightning.loggers import TensorBoardLogger
from torch import Tensor

from er_lightning.sparsity.topology import dead_units, itop_rate, mask_overlap

__all__ = [
    "MASK_IMAGE_MAX_NUMEL",
    "FigureWriter",
    "dead_units_figure",
    "density_figure",
    "heatmap_figure",
    "itop_overlap_figure",
    "mask_image",
    "short_names",
    "tensorboard_writers",
]

#: Masks with at most this many entries (and at most 1024 rows and columns) are logged as images.
MASK_IMAGE_MAX_NUMEL = 65536


def short_names(names: Sequence[str]) -> list[str]:
    """Layer labels: the FQNs without their common leading modules (``model.``) and without ``.weight``."""
    parts = [n.split(".") for n in names]
    common = os.path.commonprefix(parts) if len(parts) > 1 else []
    cut = min(len(common), min((len(p) - 1 for p in parts), default=0))
    out = []
    for p in parts:
        label = ".".join(p[cut:])
        out.append(label[: -len(".weight")] if label.endswith(".weight") else label)
    return out


def _layer_axes(n: int, width: float = 7.0) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, 1.2 + 0.28 * max(n, 1)), layout="constrained")
    return fig, fig.add_subplot()


def density_figure(
    names: Sequence[str], densities: Sequence[float], targets: Sequence[float] | None = None, title: str = ""
) -> Figure:
    """Horizontal bars of the density per layer (log scale), the target of each layer as a black tick."""
    labels = short_names(names)
    fig, ax = _layer_axes(len(labels))
    y = list(range(len(labels)))
    ax.barh(y, densities, color="#4477aa", label="density")
    if targets is not None:
        ax.scatter(targets, y, marker="|", s=200, color="black", label="target", zorder=3)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    lo = min([d for d in [*densities, *(targets or [])] if d > 0] or [1.0])
    ax.set_xlim(max(lo / 2, 1e-6), 1.05)
    ax.set_xlabel("density (fraction of weights kept)")
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def heatmap_figure(
    names: Sequence[str], steps: Sequence[int], rows: Sequence[Sequence[float]], title: str = ""
) -> Figure:
    """Density per layer (rows of the image) at each recorded step (columns), log colour scale."""
    from matplotlib.colors import LogNorm

    labels = short_names(names)
    data = torch.tensor(rows, dtype=torch.float64).T.clamp_min(1e-6).numpy() if rows else [[1.0]]
    fig, ax = _layer_axes(len(labels), width=8.0)
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap="viridis", norm=LogNorm(vmax=1.0))
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ticks = sorted({0, len(steps) - 1, *range(0, len(steps), max(len(steps) // 6, 1))}) if steps else []
    ax.set_xticks(ticks, [str(steps[i]) for i in ticks], fontsize=8)
    ax.set_xlabel("optimizer step of the mask change")
    fig.colorbar(image, ax=ax, label="density")
    ax.set_title(title, fontsize=10)
    return fig


def _paired_bars(
    names: Sequence[str],
    first: tuple[Sequence[float], str, str],
    second: tuple[Sequence[float], str, str],
    xlabel: str,
    title: str,
) -> tuple[Figure, Any]:
    """Two bars per layer in [0, 1], each given as (values, colour, legend label)."""
    labels = short_names(names)
    fig, ax = _layer_axes(len(labels))
    y = torch.arange(len(labels), dtype=torch.float64)
    for offset, (values, color, label) in ((-0.2, first), (0.2, second)):
        ax.barh((y + offset).tolist(), values, height=0.4, color=color, label=label)
    ax.set_yticks(y.tolist(), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 1.0)
    ax.set_xlabel(xlabel)
    ax.legend(loc="best", fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig, ax


def itop_overlap_figure(
    names: Sequence[str], itop: Sequence[float], overlap: Sequence[float], title: str = ""
) -> Figure:
    """Two bars per layer: the share of its weights ever active (ITOP rate) and of its initial mask still active."""
    fig, _ = _paired_bars(
        names,
        (itop, "#ee7733", "ever active (ITOP rate)"),
        (overlap, "#009988", "initial mask still active"),
        "share (ITOP: of all weights; overlap: of the initial mask)",
        title,
    )
    return fig


def dead_units_figure(
    names: Sequence[str],
    dead_out: Sequence[int],
    outputs: Sequence[int],
    dead_in: Sequence[int],
    inputs: Sequence[int],
    title: str = "",
) -> Figure:
    """Share of dead output units (no active input) and dead input units (no active output), per layer."""
    fig, ax = _paired_bars(
        names,
        ([d / max(n, 1) for d, n in zip(dead_out, outputs)], "#cc3311", "outputs with no active input"),
        ([d / max(n, 1) for d, n in zip(dead_in, inputs)], "#bbbbbb", "inputs with no active output"),
        "share of the layer's units that are dead",
        title,
    )
    for i, (do, n_o, di, n_i) in enumerate(zip(dead_out, outputs, dead_in, inputs)):
        if do or di:
            ax.text(1.0, i, f" {do}/{n_o} out, {di}/{n_i} in", va="center", fontsize=7)
    return fig


def mask_image(mask: Tensor) -> Tensor | None:
    """The mask as a (1, out, in·kernel) float image (1 = active), or ``None`` if it is too large or 1-D."""
    if mask.dim() < 2 or mask.numel() > MASK_IMAGE_MAX_NUMEL:
        return None
    image = mask.detach().reshape(mask.shape[0], -1)
    if max(image.shape) > 1024:
        return None
    return image.to(device="cpu", dtype=torch.float32).unsqueeze(0)


def tensorboard_writers(trainer: pl.Trainer) -> list[Any]:
    """The ``SummaryWriter`` of every TensorBoard logger of ``trainer`` (other loggers have no figures)."""
    return [lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


class FigureWriter:
    """Draws the figures of one sparsity callback and writes them to the trainer's TensorBoard loggers.

    Args:
        method: the callback's name, shown in figure titles.
        topology: also draw the heat map and the dead-unit chart at epoch ends (methods whose masks move: DST,
            STR). Drawing a figure takes a good fraction of a second on a CPU, so the bar chart is drawn at mask changes and the rest at
            epoch ends.

    Example:
        >>> fw = FigureWriter("RigL", topology=True)
        >>> fw.record(0, {"fc.weight": 0.1})
        >>> fw.history
        [(0, [0.1])]
    """

    def __init__(self, method: str, topology: bool = False) -> None:
        self.method = method
        self.topology = topology
        self.history: list[tuple[int, list[float]]] = []
        self._names: list[str] = []

    def record(self, step: int, densities: Mapping[str, float]) -> None:
        """Remember the densities at a mask change (one column of the heat map; a step recorded twice is replaced)."""
        names = list(densities)
        if names != self._names:
            self._names, self.history = names, []
        if self.history and self.history[-1][0] == step:
            self.history.pop()
        self.history.append((step, [float(densities[n]) for n in names]))

    @torch.no_grad()
    def mask_change(
        self,
        trainer: pl.Trainer,
        masks: Mapping[str, Tensor],
        targets: Mapping[str, float],
        step: int | None = None,
    ) -> None:
        """Record the densities (a heat-map column) and write the density bar chart at ``step``
        (``trainer.global_step`` by default)."""
        names = list(masks)
        if not names:
            return
        kept = torch.stack([torch.count_nonzero(m).cpu() for m in masks.values()]).tolist()
        densities = {n: k / masks[n].numel() for n, k in zip(names, kept)}
        step = trainer.global_step if step is None else step
        self.record(step, densities)
        writers = tensorboard_writers(trainer)
        if not writers:
            return
        overall = sum(kept) / sum(m.numel() for m in masks.values())
        fig = density_figure(
            names,
            list(densities.values()),
            [targets.get(n, float("nan")) for n in names],
            title=f"{self.method}: density per layer at step {step} (overall {overall:.4f})",
        )
        for writer in writers:
            writer.add_figure("sparsity/layer_densities", fig, global_step=step, close=False)

    @torch.no_grad()
    def epoch_end(
        self,
        trainer: pl.Trainer,
        weights: Mapping[str, Tensor],
        masks: Mapping[str, Tensor],
        ever_active: Mapping[str, Tensor] | None = None,
        initial: Mapping[str, Tensor] | None = None,
    ) -> None:
        """Topology figures (heat map, dead units; ITOP and overlap when given), ``|w|`` histograms, mask images."""
        writers = tensorboard_writers(trainer)
        names = list(masks)
        if not writers or not names:
            return
        step = trainer.global_step
        figures: dict[str, Figure] = {}
        if self.topology:
            figures["sparsity/density_heatmap"] = heatmap_figure(
                self._names,
                [s for s, _ in self.history],
                [row for _, row in self.history],
                title=f"{self.method}: density per layer at each mask change",
            )
            dead = [dead_units(masks[n]) for n in names]
            figures["sparsity/dead_units"] = dead_units_figure(
                names,
                [int(o.sum()) for o, _ in dead],
                [o.numel() for o, _ in dead],
                [int(i.sum()) for _, i in dead],
                [i.numel() for _, i in dead],
                title=f"{self.method}: dead units at step {step}",
            )
        if ever_active is not None and initial is not None:
            figures["dst/itop_overlap"] = itop_overlap_figure(
                names,
                [itop_rate(ever_active[n]) for n in names],
                [mask_overlap(masks[n], initial[n].to(masks[n].device)) for n in names],
                title=f"{self.method}: ever-active share (ITOP) and initial mask kept, step {step}",
            )
        for writer in writers:
            for tag, fig in figures.items():
                writer.add_figure(tag, fig, global_step=step, close=False)
        for name, mask in masks.items():
            active = weights[name].detach()[mask.to(weights[name].device)].abs().float().cpu()
            image = mask_image(mask)
            for writer in writers:
                if active.numel():
                    writer.add_histogram(f"weights/{name}", active, global_step=step)
                if image is not None:
                    writer.add_image(f"masks/{name}", image, global_step=step)
