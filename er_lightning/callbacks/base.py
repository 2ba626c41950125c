"""The shared engine of every hard-mask callback: draw ER masks, apply them in place, keep them safe.

:class:`SparsityCallback` does everything a fixed or dynamic sparse method needs around the mask itself:

* ``setup`` (before DDP wraps the model and before ``configure_optimizers``): choose the masked parameters, resolve
  per-layer densities, draw seeded random masks, optionally initialise weights / repair flow / repair orthogonality,
  zero the masked weights in place and broadcast the masks from rank 0.
* ``on_fit_start``: move masks next to their parameters.
* ``on_before_optimizer_step`` (after backward, DDP all-reduce and AMP unscaling, before clipping and the step):
  give subclasses their topology hook (:meth:`SparsityCallback.update_masks`), then zero masked gradients in one
  fused op. With masked gradients, weights and optimizer moments that start at zero stay zero under SGD, Adam,
  AdamW and most optimizers (tested per optimizer); ``rezero_every_step=True`` re-zeroes weights and state after
  each step for optimizers that break this.
* ``state_dict``/``load_state_dict``: masks, densities, seed and the mask-defining config; a checkpoint without
  our entry, or with a different config, raises instead of silently drawing new masks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

import pytorch_lightning as pl
import torch
from jsonargparse.typing import restricted_number_type
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from er_lightning.callbacks.feedback import progress_reporter
from er_lightning.callbacks.figures import FigureWriter, tensorboard_writers
from er_lightning.callbacks.progress import StepUnitGuard
from er_lightning.masking.compute import COMPUTE_MODES, SparseComputeRouter
from er_lightning.masking.dist import broadcast_masks_, verify_masks_agree
from er_lightning.masking.flops import FLOPS_COLUMNS, FlopsCount, count_flops, flops_rows, flops_table
from er_lightning.masking.io import SPARSE_CHECKPOINT_KEY
from er_lightning.masking.masked import MaskedParams, count_zeros
from er_lightning.masking.targets import (
    LARGE_SHARE,
    default_targets,
    large_dense_parameters,
    original_named_parameters,
    parameter_aliases,
    select_targets,
)
from er_lightning.sparsity.checks import check_bool, check_density, check_patterns
from er_lightning.sparsity.distributions import DENSITY_METHODS, layer_densities
from er_lightning.sparsity.flow import preserve_flow_
from er_lightning.sparsity.init import he_sparse_, looks_linear_, ortho_objective, ortho_repair_
from er_lightning.sparsity.progress import report, reporting
from er_lightning.sparsity.sampling import layer_generator, sample_masks

__all__ = [
    "DISTRIBUTION_ALIASES",
    "INIT_METHODS",
    "Density",
    "Distribution",
    "SparsityCallback",
    "resolve_distribution",
]

log = logging.getLogger(__name__)

#: Upstream ``--sparse-init`` / ``er_sparse_method`` names accepted as aliases of our density rules.
#: ``ER_same_params`` is how the seed README labels the balanced rule ("Uniform (ER_same_params)" there is
#: ambiguous: the code path behind it is the same-parameters-per-layer rule, so we map it to ``balanced``).
DISTRIBUTION_ALIASES: dict[str, str] = {
    "ERK": "erk",
    "ER": "er",
    "ER_same_params": "balanced",
    "ER_same_params_per_layer": "balanced",
    "same_params": "balanced",
    "pyramid": "pyramidal",
    "pyramid_sparsity": "pyramidal",
    "ER_init": "uniform",
}

INIT_METHODS = ("default", "he_sparse", "looks_linear")

if TYPE_CHECKING:
    Density = float
else:
    #: A fraction of weights kept, in (0, 1]; LightningCLI rejects other values at parse time with one line.
    Density = restricted_number_type(
        "Density", float, [(">", 0), ("<=", 1)], docstring="a fraction of weights kept, in (0, 1]"
    )

#: Density rules and their upstream aliases (``DENSITY_METHODS`` and :data:`DISTRIBUTION_ALIASES`), as a type
#: LightningCLI checks at parse time, listing the valid names.
Distribution = Literal[
    "uniform",
    "er",
    "erk",
    "balanced",
    "pyramidal",
    "custom",
    "ERK",
    "ER",
    "ER_same_params",
    "ER_same_params_per_layer",
    "same_params",
    "pyramid",
    "pyramid_sparsity",
    "ER_init",
]

# Offsets of the seed for init and flow repair, so that they never share a random stream with mask sampling
# (which uses the plain seed, at step 0 for the initial draw and at the update step for DST growth).
_INIT_STREAM = 0x9E3779B97F4A7C15
_FLOW_STREAM = 0xC2B2AE3D27D4EB4F


#: Mask-config keys added after ``FORMAT_VERSION`` 1, with the value a checkpoint without them was written with.
_ADDED_CONFIG_DEFAULTS: dict[str, Any] = {"embeddings": False}


def _stream_seed(seed: int, stream: int) -> int:
    return (seed + stream) % (1 << 64)


def resolve_distribution(name: str, extra: Sequence[str] = ()) -> str:
    """Map an upstream alias to our name and check it is known.

    Args:
        name: a density rule (``uniform``, ``er``, ``erk``, ``balanced``, ``pyramidal``, ``custom``), an upstream
            alias from :data:`DISTRIBUTION_ALIASES`, or one of ``extra``.
        extra: further names a subclass accepts (e.g. score-derived distributions).

    Raises:
        ValueError: unknown name; the message lists every valid one.
    """
    resolved = DISTRIBUTION_ALIASES.get(name, name)
    valid = (*DENSITY_METHODS, *extra)
    if resolved not in valid:
        raise ValueError(
            f"unknown distribution {name!r}; valid: {sorted(valid)} or upstream aliases {sorted(DISTRIBUTION_ALIASES)}"
        )
    return resolved


class SparsityCallback(Callback):
    """Base class: draws random ER masks at ``setup`` and applies them in place during training.

    Subclasses change behaviour through hooks, not by rewriting the loop: :meth:`compute_masks` (how the initial
    masks are chosen) and :meth:`update_masks` (topology changes during training).

    Args:
        density: overall fraction of weights kept over the masked parameters, in (0, 1].
        distribution: layer-wise density rule (see :func:`er_lightning.sparsity.layer_densities`) or an upstream
            alias (:data:`DISTRIBUTION_ALIASES`).
        sampling: ``"exact"`` keeps exactly ``round(d_l · n_l)`` entries per layer; ``"bernoulli"`` draws every
            entry independently (upstream).
        seed: seeds every random mask (with the layer index); independent of the global RNG.
        include: glob patterns of parameter names to mask instead of the default (every weight a matmul or
            convolution consumes: linear, conv, attention projections; see
            :func:`~er_lightning.masking.targets.default_targets`).
        exclude: glob patterns of parameter names to leave dense.
        embeddings: also mask ``nn.Embedding``/``nn.EmbeddingBag`` tables (off by default: a lookup multiplies
            nothing, so masking a table saves memory, not compute; a table tied to a linear head is masked
            either way, once).
        dense_first_layer: leave the first masked layer dense.
        dense_last_layer: leave the last masked layer dense (usually the classifier).
        redistribute: make layers that would exceed density 1 dense and spread the surplus (exact overall
            density); ``False`` reproduces upstream's clamped ERK (STR) and capped balanced rules.
        power_scale: exponent of the ERK score.
        custom_densities: per-layer densities for ``distribution="custom"`` (FQN → density).
        init: ``"default"`` keeps the model's init; ``"he_sparse"`` draws N(0, √(2/(fan_in·d_l))); ``"looks_linear"``
            is the looks-linear orthogonal init scaled by 1/√d_l.
        flow_preservation: after drawing, connect every output and input unit that has no connection.
        ortho_repair: optimise ‖(M⊙W)(M⊙W)ᵀ − I‖_F per layer after drawing (``ortho_steps`` SGD steps at
            ``ortho_lr``).
        ortho_steps: SGD steps of the ortho repair per layer, >= 1 (upstream 1000).
        ortho_lr: learning rate of the ortho repair, > 0.
        rezero_every_step: also re-zero weights and optimizer state after every step (for optimizers for which
            masked gradients do not keep zeros at zero).
        verify_masks: all-gather mask checksums after every mask change and raise if ranks disagree (debugging).
        log_layer_densities: also log one TensorBoard scalar per layer (``sparsity/density/<fqn>``).
        compute: how masked ``Conv2d``/``Linear`` layers compute. ``"dense"``: dense ops on the masked weights
            (any device). ``"sparse"``: the CPU sparse kernels of :mod:`er_lightning.compute` over the active
            weights only (forward, input and weight gradient; float32; other devices, dtypes and layer types
            compute dense, logged once per layer). ``"auto"``: per layer, whichever of the two a short timed
            probe on the first training batch finds faster (logged). The model, its parameters and its
            ``state_dict`` are the same in every mode.
    """

    #: Whether the callback's masks are hard (in place) masks that the sparse kernels can compute with.
    SUPPORTS_SPARSE_COMPUTE = True

    #: Bumped when the layout of :meth:`state_dict` changes.
    FORMAT_VERSION = 1
    #: Whether the heat map and dead-unit figures are drawn (methods whose masks move during training).
    TOPOLOGY_FIGURES: bool = False
    #: Distribution names accepted beyond the density rules (subclasses extend).
    EXTRA_DISTRIBUTIONS: tuple[str, ...] = ()

    def __init__(
        self,
        density: Density = 0.1,
        distribution: Distribution = "erk",
        sampling: Literal["exact", "bernoulli"] = "exact",
        seed: int = 0,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        embeddings: bool = False,
        dense_first_layer: bool = False,
        dense_last_layer: bool = False,
        redistribute: bool = True,
        power_scale: float = 1.0,
        custom_densities: dict[str, float] | None = None,
        init: Literal["default", "he_sparse", "looks_linear"] = "default",
        flow_preservation: bool = False,
        ortho_repair: bool = False,
        ortho_steps: int = 1000,
        ortho_lr: float = 1e-2,
        rezero_every_step: bool = False,
        verify_masks: bool = False,
        log_layer_densities: bool = False,
        compute: Literal["dense", "sparse", "auto"] = "dense",
    ) -> None:
        super().__init__()
        if compute not in COMPUTE_MODES:
            raise ValueError(f"compute must be one of {list(COMPUTE_MODES)}, got {compute!r}")
        if compute != "dense" and not self.SUPPORTS_SPARSE_COMPUTE:
            raise ValueError(
                f"{type(self).__name__} learns its mask through a parametrization; compute={compute!r} needs hard "
                "masks. Train with compute='dense', then export the baked model with er_lightning.export.to_sparse"
            )
        self.compute = compute
        self.router: SparseComputeRouter | None = None
        self.density = check_density(density)
        self.distribution = resolve_distribution(distribution, self.EXTRA_DISTRIBUTIONS)
        if sampling not in ("exact", "bernoulli"):
            raise ValueError(f"sampling must be 'exact' or 'bernoulli', got {sampling!r}")
        if init not in INIT_METHODS:
            raise ValueError(f"unknown init {init!r}; valid: {list(INIT_METHODS)}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise TypeError(f"seed must be an int, got {seed!r}")
        if self.distribution == "custom" and not custom_densities:
            raise ValueError(
                "distribution='custom' needs custom_densities: a mapping of parameter name -> density"
            )
        if custom_densities is not None and self.distribution != "custom":
            raise ValueError(
                f"custom_densities is only read with distribution='custom', got distribution={distribution!r}; "
                "set distribution='custom' to use them, or drop custom_densities"
            )
        if ortho_steps < 1 or ortho_lr <= 0:
            raise ValueError(f"ortho_steps must be >= 1 and ortho_lr > 0, got {ortho_steps} and {ortho_lr}")
        if not math.isfinite(power_scale):
            raise ValueError(f"power_scale must be finite, got {power_scale}")
        for flag, value in (
            ("embeddings", embeddings),
            ("dense_first_layer", dense_first_layer),
            ("dense_last_layer", dense_last_layer),
            ("redistribute", redistribute),
            ("flow_preservation", flow_preservation),
            ("ortho_repair", ortho_repair),
            ("rezero_every_step", rezero_every_step),
            ("verify_masks", verify_masks),
            ("log_layer_densities", log_layer_densities),
        ):
            check_bool(value, flag)
        self.sampling = sampling
        self.seed = seed
        self.include = check_patterns(include, "include") or None
        self.exclude = check_patterns(exclude, "exclude") or None
        self.embeddings = embeddings
        self.dense_first_layer = dense_first_layer
        self.dense_last_layer = dense_last_layer
        self.redistribute = redistribute
        self.power_scale = float(power_scale)
        self.custom_densities = dict(custom_densities) if custom_densities else None
        self.init = init
        self.flow_preservation = flow_preservation
        self.ortho_repair = ortho_repair
        self.ortho_steps = ortho_steps
        self.ortho_lr = ortho_lr
        self.rezero_every_step = rezero_every_step
        self.verify_masks = verify_masks
        self.log_layer_densities = log_layer_densities

        self.masked: MaskedParams | None = None
        self.target_densities: dict[str, float] = {}
        self.flow_repairs: dict[str, tuple[int, int]] = {}
        #: FQN → ortho objective (before, after) of the repair at setup.
        self.ortho_objectives: dict[str, tuple[float, float]] = {}
        self._module_id: int | None = None
        self._logged_setup = False
        self._step_hooks: list[Any] = []
        #: The fit-time weight work (init, zeroing, repairs) is done, or the weights came with a checkpoint.
        self._weights_ready = False
        self._logged_compute = False
        #: Set by subclasses whose schedules count optimizer steps; checked at every training batch.
        self.step_unit: StepUnitGuard | None = None
        self.figures = FigureWriter(type(self).__name__, topology=self.TOPOLOGY_FIGURES)
        # FLOPs accounting (counted on the first training batch of each fit)
        self.flops: FlopsCount | None = None
        self._flops_ratio_sum = 0.0
        self._flops_steps = 0
        self._flops_step_ratio: float | None = None
        self._flops_warned = False
        self._dense_gradient_step = False

    # ------------------------------------------------------------------ config
    def mask_config(self) -> dict[str, Any]:
        """The arguments that determine the masks; stored in checkpoints and compared on resume."""
        return {
            "density": self.density,
            "distribution": self.distribution,
            "sampling": self.sampling,
            "seed": self.seed,
            "include": self.include,
            "exclude": self.exclude,
            "embeddings": self.embeddings,
            "dense_first_layer": self.dense_first_layer,
            "dense_last_layer": self.dense_last_layer,
            "redistribute": self.redistribute,
            "power_scale": self.power_scale,
            "custom_densities": self.custom_densities,
        }

    # ------------------------------------------------------------------ targets and masks
    def candidate_names(self, pl_module: pl.LightningModule) -> list[str]:
        """The module's own sparsifiable parameters if it declares them, else the default rule.

        With ``embeddings=True`` the embedding tables are added to either list.
        """
        declared = getattr(pl_module, "sparsifiable_parameters", None)
        if not callable(declared):
            return default_targets(pl_module, embeddings=self.embeddings)
        names = set(declared())
        if self.embeddings:
            names.update(default_targets(pl_module, embeddings=True))
        order = [n for n, _ in pl_module.named_parameters()]
        unknown = sorted(names - set(order))
        if unknown:
            raise ValueError(
                f"{type(pl_module).__name__}.sparsifiable_parameters() names {unknown}, which are not in its "
                f"named_parameters() (a tied tensor is named once, by its first name): {order}"
            )
        return [n for n in order if n in names]

    def refuse_shared_(self, pl_module: pl.LightningModule, names: Sequence[str]) -> None:
        """Raise if a tensor in ``names`` is shared by several modules (for callbacks that parametrize weights).

        A parametrization replaces a tensor on one module; another module holding the same ``nn.Parameter`` (a
        tied head) would keep using the plain tensor, so the two uses would silently differ.
        """
        aliases = parameter_aliases(pl_module)
        shared = {n: aliases[n] for n in names if n in aliases}
        if shared:
            raise ValueError(
                f"{type(self).__name__} attaches a parametrization to one module, but these tensors are shared with "
                f"other modules, which would keep using the unmasked tensor: {shared}. Leave them dense "
                "(exclude=[...]) or untie them"
            )

    def _warn_large_dense(self, pl_module: pl.LightningModule) -> None:
        """Warn, listing them, about large tensors (>= 10 % of all parameters) the default rule leaves dense."""
        if self.include:
            return  # the user named the targets
        large = large_dense_parameters(pl_module, self.candidate_names(pl_module))
        if not large:
            return
        total = sum(p.numel() for p in pl_module.parameters())
        listed = ", ".join(f"{n} ({k} = {k / total:.0%})" for n, k in large.items())
        hint = (
            "embeddings=True masks embedding tables; "
            if any(isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag) for m in pl_module.modules())
            else ""
        )
        rank_zero_warn(
            f"{type(self).__name__}: the default targets leave these large parameters dense (each holds >= "
            f"{LARGE_SHARE:.0%} of the model's {total} parameters): {listed}. {hint}include=[...] names the "
            "tensors to mask explicitly (glob patterns; list the defaults too), which also silences this warning"
        )

    def select(self, pl_module: pl.LightningModule) -> list[str]:
        """FQNs of the parameters this callback masks (validated include/exclude patterns)."""
        return select_targets(
            pl_module,
            self.candidate_names(pl_module),
            include=self.include,
            exclude=self.exclude,
            dense_first_layer=self.dense_first_layer,
            dense_last_layer=self.dense_last_layer,
        )

    def resolve_densities(self, shapes: Mapping[str, Sequence[int]]) -> dict[str, float]:
        """Per-layer target densities from the configured rule."""
        return layer_densities(
            shapes,
            self.density,
            self.distribution,
            redistribute=self.redistribute,
            power_scale=self.power_scale,
            custom=self.custom_densities,
        )

    def compute_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, shapes: Mapping[str, Sequence[int]]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """Hook: the initial per-layer densities and bool masks (CPU). Default: seeded random ER masks."""
        densities = self.resolve_densities(shapes)
        return densities, sample_masks(shapes, densities, seed=self.seed, sampling=self.sampling)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = type(trainer.strategy).__name__
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise RuntimeError(
                f"{type(self).__name__} does not support the {strategy} strategy yet; use DDP ('ddp') or one device"
            )
        if self.masked is not None and self._module_id == id(pl_module):
            # setup runs again for every stage: keep the masks we have. The fit-time weight work happens at the
            # first `fit`, also when validate/test ran first; masks that were never applied zero nothing.
            if stage == "fit" and not self._weights_ready:
                self.prepare_weights_(trainer, pl_module)
            elif self._weights_ready:
                self.masked.apply_()
            self._route_compute(pl_module)
            return
        self._check_single_sparsity_callback(trainer)
        # Outside `fit` a fresh callback must not touch trained weights: evaluating a trained model with a new
        # callback instance would otherwise zero it at newly drawn positions. Masks are still drawn (the
        # checkpoint's masks replace them when `ckpt_path` is given), but init, repairs and zeroing wait for fit.
        names = self.select(pl_module)
        self._warn_large_dense(pl_module)
        params = dict(pl_module.named_parameters())
        shapes = {n: tuple(params[n].shape) for n in names}
        densities, masks = self.compute_masks(trainer, pl_module, shapes)
        self.target_densities = dict(densities)
        self._preserve_flow(masks)
        self._check_not_empty(masks)
        self.masked = MaskedParams({n: params[n] for n in names}, masks)
        self._module_id = id(pl_module)
        self.sync_masks_(trainer)
        if stage == "fit":
            self.prepare_weights_(trainer, pl_module)
        self._log_table(pl_module)
        self._route_compute(pl_module)

    def _route_compute(self, pl_module: pl.LightningModule) -> None:
        """(Re)attach the sparse-compute routes to the module's current layers (``compute != "dense"``)."""
        if self.compute == "dense" or self.masked is None:
            return
        if self.router is not None:
            self.router.remove()
        # the layout plan traces the module's children: training_step may call them without the module's forward
        self.router = SparseComputeRouter(
            pl_module, self.masked, self.compute, layout_scopes=list(pl_module.children())
        )

    def needs_dense_gradients(self, trainer: pl.Trainer) -> bool:
        """Hook: whether the coming optimizer step needs dense weight gradients (e.g. RigL's growth at an update
        step). Such steps compute dense under ``compute="sparse"``/``"auto"``. The static callback never does."""
        return False

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.step_unit is not None:
            self.step_unit.batch_start(trainer, pl_module)
        self._dense_gradient_step = self.needs_dense_gradients(trainer)
        if self.router is not None:
            self.router.set_dense_step(self._dense_gradient_step)
        if self.flops is None and not self._flops_warned:
            self.flops = self._count_flops(pl_module, batch)
            if self.flops is not None:
                self._log_flops_table(trainer)
        if self.flops is not None:
            pl_module.log("flops/inference_ratio", self.flops.inference_ratio, rank_zero_only=True)

    def prepare_weights_(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The fit-time weight work, exactly once per callback: init, zero masked weights, orthogonality repair.

        Runs at the first ``fit`` setup, whichever stage (``validate``, ``test``) came first, and never after the
        masks were restored from a checkpoint (its weights are the trained ones).
        """
        assert self.masked is not None
        self.init_weights_(pl_module)
        self.masked.apply_()
        if self.ortho_repair:
            self._ortho_repair(trainer)
            self.masked.apply_()
        self._weights_ready = True

    def _check_not_empty(self, masks: Mapping[str, Tensor]) -> None:
        """Raise when no weight is kept at all; warn, naming them, about layers that keep none."""
        kept = {n: int(m.sum()) for n, m in masks.items()}
        if not any(kept.values()):
            total = sum(m.numel() for m in masks.values())
            raise ValueError(
                f"{type(self).__name__}: density={self.density} with distribution={self.distribution!r} keeps no "
                f"weight in any of the {len(masks)} masked layers ({total} weights), so nothing could train; "
                f"raise density (one weight is 1/{total} = {1 / max(total, 1):.3g} of them)"
            )
        collapsed = [n for n, k in kept.items() if k == 0]
        if collapsed:
            rank_zero_warn(
                f"{type(self).__name__}: layers {collapsed} keep no weight at all (layer collapse at density "
                f"{self.density}, distribution {self.distribution!r}); they block the signal. Raise density, use "
                "another distribution (e.g. 'erk' keeps small layers denser), or leave them dense with exclude"
            )

    def _ortho_repair(self, trainer: pl.Trainer) -> None:
        """Ortho repair of every masked matrix, with progress per layer and the objective before/after logged."""
        assert self.masked is not None
        layers = [(n, p) for n, p in zip(self.masked.names, self.masked.params) if p.dim() >= 2]
        reporter = progress_reporter(trainer, type(self).__name__)
        before_all = after_all = 0.0
        with reporting(reporter):
            for i, (name, p) in enumerate(layers, 1):
                mask = self.masked.masks[name]
                before = ortho_objective(p.data, mask)
                after = ortho_repair_(p.data, mask, steps=self.ortho_steps, lr=self.ortho_lr)
                before_all += before
                after_all += after
                self.ortho_objectives[name] = (before, after)
                report(
                    "ortho repair (layers)", i, len(layers), objective_before=before, objective_after=after
                )
        rank_zero_info(
            f"{type(self).__name__}: ortho repair of {len(layers)} layers ({self.ortho_steps} steps each): "
            f"sum of ‖(M⊙W)(M⊙W)ᵀ − I‖_F {before_all:.6g} → {after_all:.6g}"
        )

    def _check_single_sparsity_callback(self, trainer: pl.Trainer) -> None:
        others = [
            type(cb).__name__
            for cb in trainer.callbacks
            if isinstance(cb, SparsityCallback) and cb is not self
        ]
        if others:
            raise ValueError(
                f"{type(self).__name__} and {others} are all attached to this Trainer; each owns the masks of the "
                "same parameters, so use exactly one sparsity callback per run (remove the others from "
                "trainer.callbacks, e.g. the quickstart's StaticSparsity when adding a DST callback)"
            )

    def init_weights_(self, pl_module: pl.LightningModule) -> None:
        """Hook: weight init of the fit, before masked weights are zeroed (subclasses add their own inits).

        The default is the optional sparse-aware init (``he_sparse`` or ``looks_linear``) from seeded generators.
        """
        if self.init == "default":
            return
        assert self.masked is not None
        for index, (name, param) in enumerate(zip(self.masked.names, self.masked.params)):
            weight = param.data
            if weight.dim() < 2:
                continue
            gen = layer_generator(_stream_seed(self.seed, _INIT_STREAM), index)
            d = max(self.target_densities.get(name, 1.0), 1.0 / weight.numel())
            if self.init == "he_sparse":
                he_sparse_(weight, d, generator=gen)
            else:
                looks_linear_(weight, d, first=index == 0, generator=gen)

    def _preserve_flow(self, masks: dict[str, Tensor]) -> None:
        """Connect disconnected units (after init, as upstream orders it); counts are logged."""
        if not self.flow_preservation:
            return
        for index, name in enumerate(masks):
            fixed = preserve_flow_(
                masks[name], generator=layer_generator(_stream_seed(self.seed, _FLOW_STREAM), index)
            )
            if any(fixed):
                self.flow_repairs[name] = fixed
        total_out = sum(o for o, _ in self.flow_repairs.values())
        total_in = sum(i for _, i in self.flow_repairs.values())
        rank_zero_info(
            f"{type(self).__name__}: flow preservation connected {total_out} output and {total_in} input units "
            f"in {len(self.flow_repairs)} layers"
        )

    def sync_masks_(self, trainer: pl.Trainer) -> None:
        """Broadcast masks from rank 0 (and check agreement in debug mode). Call after every mask change."""
        assert self.masked is not None
        device = trainer.strategy.root_device
        broadcast_masks_(self.masked.masks, device)
        if self.verify_masks:
            verify_masks_agree(self.masked.masks, device)

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masked is None:
            raise RuntimeError(f"{type(self).__name__}.setup did not run before fit")
        # parametrized weights (supermask, STR) are rebound through their plain names
        self._rebind(pl_module, "setup")
        self._route_compute(pl_module)
        if self.verify_masks:
            verify_masks_agree(self.masked.masks, trainer.strategy.root_device)
        self.hook_manual_optimizers_(trainer, pl_module)

    def hook_manual_optimizers_(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Under manual optimization, zero masked gradients in a step pre-hook of every optimizer.

        With ``automatic_optimization=False`` the module steps its optimizers itself (a GAN's two optimizers, a
        step every k batches). Lightning still calls ``on_before_optimizer_step`` when the module steps through
        the ``LightningOptimizer`` that ``self.optimizers()`` returns, but not when it steps the raw optimizer
        (``self.optimizers(use_pl_optimizer=False)``). A ``torch.optim.Optimizer.register_step_pre_hook`` runs
        before every ``step()`` whatever the caller, so masked weights stay exactly zero either way. The hooks are
        removed at the end of fit. With automatic optimization nothing is hooked (the Lightning hook suffices).
        """
        self._remove_step_hooks()
        if pl_module.automatic_optimization:
            return
        for optimizer in trainer.optimizers:
            self._step_hooks.append(optimizer.register_step_pre_hook(self._mask_grads_pre_step))

    def _mask_grads_pre_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self.masked is not None:
            self.masked.mask_grads_()

    def _remove_step_hooks(self) -> None:
        for handle in getattr(self, "_step_hooks", []):
            handle.remove()
        self._step_hooks: list[Any] = []

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_step_hooks()
        # the next fit counts FLOPs again on its own first batch (the cumulative ratio carries on)
        self.flops = None
        self._flops_warned = False
        self._flops_step_ratio = None
        self._log_hparams(trainer, pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._remove_step_hooks()
        if self.router is not None:
            self.router.remove()
            self.router = None

    def _rebind(self, pl_module: pl.LightningModule, since: str) -> None:
        """Point the masks at the module's current parameter objects and re-apply them.

        A parameter replaced after the masks were drawn (in the module's ``setup``, ``configure_model`` or
        ``on_fit_start``) would otherwise keep training dense while its mask zeroes the old tensor.

        Raises:
            ValueError: a replacement has another shape (names the layer and both shapes).
        """
        assert self.masked is not None
        replaced = self.masked.rebind_(original_named_parameters(pl_module))
        self.masked.apply_()
        if replaced:
            rank_zero_warn(
                f"{type(self).__name__}: parameters {replaced} were replaced after {since} (a new tensor object "
                "with the same name); their masks now apply to the new tensors. Weight init and repairs done at "
                "setup are lost for them, and a tensor created after configure_optimizers is in no optimizer: "
                "replace layers in __init__ instead"
            )

    def _rebind_parametrized(self, pl_module: pl.LightningModule, what: str) -> None:
        """Rebind for callbacks whose layers carry a parametrization: a replaced layer has lost it, so raise.

        Raises:
            RuntimeError: a masked parameter is a new tensor object (names the layers).
        """
        assert self.masked is not None
        replaced = self.masked.rebind_(original_named_parameters(pl_module))
        if replaced:
            raise RuntimeError(
                f"{type(self).__name__}: parameters {replaced} were replaced after setup (in the module's setup, "
                f"configure_model or on_fit_start), which removed their {what}; the layer would train without it. "
                "Build or replace layers in the module's __init__, before the callback's setup"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # the module's own on_fit_start ran after ours: catch a layer it replaced
        self._rebind(pl_module, "on_fit_start")
        self._route_compute(pl_module)
        self.log_densities(trainer, setup=True)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        assert self.masked is not None
        flops = self.flops  # the forward and backward of this step ran under the masks before any update
        self.update_masks(trainer, pl_module, optimizer)
        self.masked.mask_grads_()
        if flops is not None:
            ratio = flops.train_step_ratio(self.weight_gradient_flops(flops, trainer.global_step))
            self._flops_step_ratio = ratio
            self._flops_ratio_sum += ratio
            self._flops_steps += 1

    def update_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Hook for topology changes; gradients are dense here. The static callback changes nothing."""

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.step_unit is not None:
            self.step_unit.batch_end(trainer)
        if self.rezero_every_step and self.masked is not None:
            self.masked.apply_()
            self.masked.zero_optimizer_state_(trainer.optimizers)
        if self.router is not None:
            self.router.set_dense_step(False)
            if not self._logged_compute:  # after the first batch: auto has probed every layer it ran
                self._logged_compute = True
                self._log_compute()
        if self._flops_step_ratio is not None:
            pl_module.log("flops/train_step_ratio", self._flops_step_ratio, rank_zero_only=True)
            pl_module.log(
                "flops/train_cumulative_ratio",
                self._flops_ratio_sum / max(self._flops_steps, 1),
                rank_zero_only=True,
            )

    @rank_zero_only
    def _log_compute(self) -> None:
        assert self.router is not None
        decisions = self.router.decisions()
        sparse = sum(1 for d in decisions.values() if d == "sparse")
        lines = [
            f"{type(self).__name__}: compute={self.compute!r}, {sparse} of {len(decisions)} layers sparse"
        ]
        for name, what in decisions.items():
            route = self.router.routes.get(name)
            timing = ""
            if route is not None and route.timings is not None:
                timing = f"  (probe: dense {route.timings[0] * 1e3:.2f} ms, sparse {route.timings[1] * 1e3:.2f} ms)"
            lines.append(f"  {name}: {what}{timing}")
        rank_zero_info("\n".join(lines))

    # ------------------------------------------------------------------ FLOPs accounting
    def current_masks(self) -> dict[str, Tensor]:
        """The masks the forward pass computes with now (hard masks here; learned masks in subclasses)."""
        assert self.masked is not None
        return dict(self.masked.masks)

    def weight_gradient_flops(self, flops: FlopsCount, step: int) -> float | None:
        """Hook: FLOPs of the weight gradient of the step before optimizer step ``step + 1``.

        ``None`` (default) means a sparse weight gradient, as costly as the sparse forward (RigL App. H); a method
        whose rule reads the dense weight gradient (RigL's growth) returns ``flops.dense`` on those steps.
        """
        return None

    def refresh_flops_(self) -> None:
        """Recount the active weights for the FLOPs accounting; call after every mask change."""
        if self.flops is not None and self.masked is not None:
            self.flops = self.flops.with_masks(self.current_masks())

    def _count_flops(self, pl_module: pl.LightningModule, batch: Any) -> FlopsCount | None:
        """Forward FLOPs on the model input of ``batch`` (its first element), or on ``example_input_array``."""
        x = batch[0] if isinstance(batch, (list, tuple)) and batch else batch
        if not isinstance(x, (Tensor, Mapping)):
            x = getattr(pl_module, "example_input_array", None)
        if self.router is not None:
            self.router.set_dense_step(True)  # count the dense ops the masks scale (kernels are not counted)
        try:
            if x is None:
                raise TypeError(f"no tensor found in a batch of type {type(batch).__name__}")
            return count_flops(pl_module, x, self.current_masks())
        except Exception as err:  # the accounting is a report: say why it is missing and train on
            self._flops_warned = True
            rank_zero_warn(
                f"{type(self).__name__}: FLOPs accounting skipped ({type(err).__name__}: {err}). It calls the "
                "LightningModule on the first element of a training batch; make forward() accept it, or set "
                "example_input_array"
            )
            return None
        finally:
            if self.router is not None:
                self.router.set_dense_step(self._dense_gradient_step)

    @rank_zero_only
    def _log_flops_table(self, trainer: pl.Trainer) -> None:
        if self.flops is None:
            return
        rows = flops_rows(self.flops, self.target_densities)
        markdown = "\n".join(
            ["| " + " | ".join(FLOPS_COLUMNS) + " |", "|" + "---|" * len(FLOPS_COLUMNS)]
            + ["| " + " | ".join(r) + " |" for r in rows]
        )
        for writer in tensorboard_writers(trainer):
            writer.add_text("sparsity/layers", markdown, global_step=trainer.global_step)
        rank_zero_info(
            flops_table(
                self.flops,
                self.target_densities,
                title=f"{type(self).__name__}: forward FLOPs on one training batch "
                f"({self.flops.examples} examples), per example",
            )
        )

    # ------------------------------------------------------------------ logging
    @rank_zero_only
    def _log_table(self, pl_module: torch.nn.Module) -> None:
        if self.masked is None:
            return
        rank_zero_info(self.setup_table(pl_module))

    def setup_table(self, pl_module: torch.nn.Module) -> str:
        """The per-tensor table logged at ``setup``: target and actual density, kept weights; then two totals.

        ``masked tensors`` sums the masks. ``whole model`` counts every parameter of ``pl_module`` once (a tied
        tensor once, listed under all its names) and its nonzero entries as they are now, so it agrees with a count
        of zeros over the model's ``state_dict`` (with shared tensors counted once): the masked zeros plus anything
        else that is zero (e.g. zero-initialised biases).
        """
        assert self.masked is not None
        counts = self.masked.counts()
        aliases = parameter_aliases(pl_module)
        labels = {n: " = ".join([n, *aliases.get(n, [])]) for n in counts}
        width = max(len(s) for s in [*labels.values(), "masked tensors", "whole model"])
        lines = [f"{type(self).__name__}: {self.distribution} masks, target density {self.density}"]
        lines.append(f"{'parameter':<{width}}  {'shape':<20} {'target':>8} {'density':>8} {'kept':>10}")
        for name, (kept, total) in counts.items():
            shape = "x".join(str(s) for s in self.masked.masks[name].shape)
            target = self.target_densities.get(name, float("nan"))
            lines.append(
                f"{labels[name]:<{width}}  {shape:<20} {target:>8.4f} {kept / total:>8.4f} {kept:>10d}"
            )
        kept_all = sum(k for k, _ in counts.values())
        total_all = sum(t for _, t in counts.values())
        lines.append(
            f"{'masked tensors':<{width}}  {f'{total_all} weights':<20} {'':>8} {kept_all / total_all:>8.4f} "
            f"{kept_all:>10d}"
        )
        zeros, numel = count_zeros(pl_module)
        lines.append(
            f"{'whole model':<{width}}  {f'{numel} parameters':<20} {'':>8} {(numel - zeros) / max(numel, 1):>8.4f} "
            f"{numel - zeros:>10d}  ({zeros} zero)"
        )
        return "\n".join(lines)

    @rank_zero_only
    def log_densities(
        self,
        trainer: pl.Trainer,
        setup: bool = False,
        extra: Mapping[str, float] | None = None,
        step: int | None = None,
    ) -> None:
        """Write global (and optionally per-layer) densities to every logger; on setup also a per-layer figure.

        ``step`` is the logged step, ``trainer.global_step`` by default.
        """
        if self.masked is None or not trainer.loggers:
            return
        densities = self.masked.densities()
        metrics = {"sparsity/density_global": self.masked.global_density()}
        if self.log_layer_densities:
            metrics.update({f"sparsity/density/{n}": d for n, d in densities.items()})
        if extra:
            metrics.update(extra)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step if step is None else step)
        self.figures.mask_change(trainer, self.current_masks(), self.density_targets(), step=step)

    def density_targets(self) -> dict[str, float]:
        """Per-layer targets marked in the density figure (the drawn ER densities; subclasses refine)."""
        return dict(self.target_densities)

    def topology_history(self) -> tuple[dict[str, Tensor], dict[str, Tensor]] | None:
        """Hook: (ever-active masks, initial masks) for the ITOP/overlap figure; ``None`` where masks never move."""
        return None

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_epoch_figures(trainer)

    @rank_zero_only
    def _log_epoch_figures(self, trainer: pl.Trainer) -> None:
        if self.masked is None:
            return
        history = self.topology_history()
        self.figures.epoch_end(
            trainer,
            dict(zip(self.masked.names, self.masked.params)),
            self.current_masks(),
            *(history if history is not None else (None, None)),
        )

    @rank_zero_only
    def _log_hparams(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The callback's configuration and the final metrics in TensorBoard's HPARAMS tab (``hp/<metric>``)."""
        loggers = [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]
        if not loggers or self.masked is None:
            return
        params: dict[str, Any] = {"sparsity/method": type(self).__name__}
        params.update({f"sparsity/{k}": v for k, v in self.mask_config().items() if k != "method"})
        hparams = getattr(pl_module, "hparams", {})
        params.update({f"model/{k}": v for k, v in dict(hparams).items()})
        metrics = {
            f"hp/{k}": float(v)
            for k, v in trainer.callback_metrics.items()
            if isinstance(v, Tensor) and v.numel() == 1 and math.isfinite(float(v))
        }
        masks = self.current_masks()
        kept = sum(int(torch.count_nonzero(m)) for m in masks.values())
        metrics["hp/density_final"] = kept / max(sum(m.numel() for m in masks.values()), 1)
        for logger in loggers:
            logger.log_hyperparams(params, metrics, step=trainer.global_step)

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        if self.masked is None:
            return {}
        return {
            "format_version": self.FORMAT_VERSION,
            "config": self.mask_config(),
            "names": list(self.masked.names),
            "masks": self.masked.state_masks(),
            "counts": {n: kept for n, (kept, _) in self.masked.counts().items()},
            "target_densities": dict(self.target_densities),
            "flops_ratio_sum": self._flops_ratio_sum,
            "flops_steps": self._flops_steps,
        }

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Tells a module resumed without this callback that the checkpoint was trained sparse (and by what).
        entry = checkpoint.setdefault(SPARSE_CHECKPOINT_KEY, {})
        entry[self.state_key] = f"{type(self).__module__}.{type(self).__qualname__}"

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}):
            raise RuntimeError(
                f"the checkpoint has no state for {type(self).__name__} (key {self.state_key!r}): its masks cannot be "
                "restored. Resume from a checkpoint written with this callback attached, or start a new run "
                f"(callback states present: {sorted(checkpoint.get('callbacks', {}))})"
            )

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            raise RuntimeError(f"empty {type(self).__name__} state in checkpoint: masks cannot be restored")
        version = state_dict.get("format_version")
        if version != self.FORMAT_VERSION:
            raise RuntimeError(
                f"{type(self).__name__} checkpoint state has format_version {version}, this version reads "
                f"{self.FORMAT_VERSION}"
            )
        saved = state_dict["config"]
        current = self.mask_config()
        # keys added after format_version 1 read their default from older checkpoints
        saved = {**_ADDED_CONFIG_DEFAULTS, **saved}
        diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
            raise ValueError(
                f"{type(self).__name__} config differs from the checkpoint's ({detail}); resume with the same "
                "arguments or start a new run"
            )
        if self.masked is None:
            raise RuntimeError(f"{type(self).__name__}: masks are restored after setup; setup did not run")
        masks = state_dict["masks"]
        if list(masks) != self.masked.names:
            raise ValueError(
                f"checkpoint masks are for {list(masks)}, but this model masks {self.masked.names}"
            )
        self._check_checkpoint_masks(masks, state_dict.get("counts"), state_dict.get("target_densities", {}))
        for name, mask in masks.items():
            self.masked.set_mask_(name, mask)
        self.target_densities = dict(state_dict.get("target_densities", self.target_densities))
        self._weights_ready = True  # the checkpoint's weights are the trained ones: no init at fit
        self._flops_ratio_sum = float(state_dict.get("flops_ratio_sum", 0.0))
        self._flops_steps = int(state_dict.get("flops_steps", 0))
        self.load_extra_state(state_dict)

    def _check_checkpoint_masks(
        self, masks: Mapping[str, Any], counts: Mapping[str, int] | None, targets: Mapping[str, float]
    ) -> None:
        """Every mask a dense bool tensor of the parameter's shape, keeping the count recorded next to it.

        ``counts`` (written since masks were counted in checkpoints; older checkpoints have none) is compared
        per layer, so a mask edited after saving (all True, or a float/NaN tensor) is refused instead of
        training dense.
        """
        assert self.masked is not None
        problems = []
        for name, mask in masks.items():
            expected = tuple(self.masked.masks[name].shape)
            if not isinstance(mask, Tensor) or mask.layout != torch.strided or mask.dtype != torch.bool:
                kind = (
                    f"{mask.layout} {mask.dtype} tensor" if isinstance(mask, Tensor) else type(mask).__name__
                )
                problems.append(f"{name}: a {kind}, masks are dense bool tensors")
            elif tuple(mask.shape) != expected:
                problems.append(f"{name}: shape {tuple(mask.shape)}, parameter has {expected}")
            elif counts is not None and int(mask.sum()) != counts.get(name):
                problems.append(
                    f"{name}: keeps {int(mask.sum())} of {mask.numel()} weights, the checkpoint recorded "
                    f"{counts.get(name)} (target density {targets.get(name, float('nan')):.6f})"
                )
        if problems:
            raise ValueError(
                f"{type(self).__name__}: the checkpoint's masks are not what this callback saved ("
                + "; ".join(problems)
                + "). The file was edited or damaged; resume from an intact checkpoint or start a new run"
            )

    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        """Hook for subclasses: restore what they added to :meth:`state_dict` (masks are restored already)."""
