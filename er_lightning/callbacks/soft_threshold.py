"""STR with ER masks: soft threshold reparameterisation on a fixed random Erdős–Rényi support.

:class:`SoftThreshold` is a :class:`~er_lightning.callbacks.base.SparsityCallback`: at ``setup`` it draws the ER
support M_ER exactly as :class:`~er_lightning.callbacks.static.StaticSparsity` does (same arguments and seed, same
masks), zeroes W outside it in place and keeps it there by masking gradients before every optimizer step. It then
puts a :class:`~er_lightning.masking.soft_threshold.SoftThresholdParametrization` on every masked weight, so the
network computes with

    Ŵ = sign(W) · ReLU(|W| − g(s)),

which is zero outside M_ER (W = 0 there) and wherever |W| ≤ g(s). The thresholds s are parameters of the model
(``<module>.parametrizations.weight.0.threshold``), created before ``configure_optimizers``, so the optimizer trains
them; DDP all-reduces their gradients like any parameter.

Design notes (why it looks like this):

* The ER mask is applied in place (STYLE §2: a soft threshold stacks on an in-place ER mask), not multiplied inside
  the parametrization: no mask buffer for DDP to re-send every step and no extra product in the forward.
* After ``register_parametrization`` the weight's FQN becomes ``<module>.parametrizations.weight.original``, but
  the ``Parameter`` object is the same. Masks, checkpoints, logs and exported files keep the *original* FQN
  (``net.conv1.weight``), and :meth:`SoftThreshold.on_fit_start` rebinds the masks through
  :func:`~er_lightning.masking.targets.original_fqn`.
* Thresholds live in the model's ``state_dict``; the callback state holds the masks, the mask config and the
  controller's start density. Resuming works because ``setup`` (which attaches the parametrizations) runs before
  Lightning restores the model.
"""

from __future__ import annotations

import copy
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities import rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from er_lightning.callbacks.base import INIT_METHODS, Density, Distribution, SparsityCallback
from er_lightning.callbacks.progress import StepUnitGuard
from er_lightning.masking.dist import is_distributed, verify_masks_agree
from er_lightning.masking.io import save_masks
from er_lightning.masking.soft_threshold import (
    SoftThresholdParametrization,
    SparseFunction,
    attach_soft_threshold_,
    check_sparse_function,
    critical_shifts,
    find_soft_thresholds,
    load_densities,
    remove_soft_thresholds_,
    rescale_densities,
    save_densities,
    shift_for_count,
)
from er_lightning.masking.targets import original_named_parameters
from er_lightning.sparsity.checks import check_bool
from er_lightning.sparsity.sampling import layer_generator, sample_masks

__all__ = ["STR_DISTRIBUTION_ALIASES", "SoftThreshold", "TargetSchedule", "scheduled_density"]

log = logging.getLogger(__name__)

TargetSchedule = Literal["cosine", "linear", "constant"]

#: Upstream STR ``--er-sparse-method`` names accepted beyond the base aliases.
STR_DISTRIBUTION_ALIASES: dict[str, str] = {"str-induced-er": "str_induced", "str_induced_er": "str_induced"}

_KAIMING_STREAM = 0x5851F42D4C957F2D


def scheduled_density(
    progress: float,
    start_density: float,
    target_density: float,
    schedule: TargetSchedule = "cosine",
    start: float = 0.0,
    end: float = 1.0,
) -> float:
    """The density the controller asks for at ``progress`` (fraction of training done, in optimizer steps).

    With q = clamp((progress − start) / (end − start), 0, 1):

    * ``cosine``: d_T + (d_0 − d_T)·(1 + cos(πq)) / 2;
    * ``linear``: d_T + (d_0 − d_T)·(1 − q);
    * ``constant``: d_T from ``start`` on.

    Example:
        >>> scheduled_density(0.5, 0.4, 0.1, "linear")
        0.25
    """
    span = max(end - start, 1e-12)
    q = min(max((progress - start) / span, 0.0), 1.0)
    if schedule == "cosine":
        f = 0.5 * (1.0 + math.cos(math.pi * q))
    elif schedule == "linear":
        f = 1.0 - q
    elif schedule == "constant":
        f = 0.0
    else:
        raise ValueError(f"unknown target_schedule {schedule!r}; valid: cosine, linear, constant")
    return target_density + (start_density - target_density) * f


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


#: The density rules plus ``str_induced`` (densities exported by an earlier STR run).
STRDistribution = Literal[Distribution, "str_induced"]


class SoftThreshold(SparsityCallback):
    """Soft threshold reparameterisation (STR; Kusupati et al., ICML 2020, arXiv:2002.03231) on a random ER mask.

    The ER-with-STR experiments of Gadhikar et al. ("Why Random Pruning Is All We Need to Start Sparse", ICML
    2023, arXiv:2210.02412; upstream ``STR/``, conv type ``STRConvER``): every masked weight W is used as
    Ŵ = M_ER ⊙ sign(W)·ReLU(|W| − g(s)) with a learnable threshold s per layer (or per output channel).
    The ER support M_ER is drawn like :class:`~er_lightning.callbacks.static.StaticSparsity` (same arguments, same
    seed → same masks) and kept in place; see the module docstring for the design.

    **How sparsity grows.** With STR's ``s_init = -200``, g(s) = sigmoid(s) is 0 in float32 and so is its gradient:
    at first Ŵ = W on the support. Weight decay on s pulls it towards 0, the threshold rises and small weights
    drop out; from then on s also learns from the loss. The weight decay of the thresholds is therefore STR's main
    knob (upstream ``--st-decay``, default: the model's weight decay). Give it through the module's parameter
    groups; on :class:`~er_lightning.module.SparseLightningModule`::

        model:
          weight_decay: 0.001
          param_groups:
            - pattern: "*.threshold"   # every s: <module>.parametrizations.weight.0.threshold
              weight_decay: 0.001      # st_decay
          no_bn_weight_decay: false    # upstream --no-bn-decay

    On another LightningModule, build the optimizer in ``configure_optimizers`` (which runs after this callback's
    ``setup``) from ``self.named_parameters()`` and put the names ending in ``.threshold`` in their own group.

    **Optional density controller** (beyond upstream, RAIVNLab/STR issues #2 and #14): with ``target_density``,
    at the end of every training epoch the realised density of Ŵ is measured and every s is shifted by one common
    δ (in logit space for ``sigmoid``, in threshold space for ``identity``; the order of the learned thresholds is
    kept) so that the realised density equals the schedule's value: from the density at the start of training to
    ``target_density``, along ``target_schedule``, between fractions ``target_start`` and ``target_end`` of the
    training steps. The final epoch end then leaves the network at ``target_density`` (up to float rounding).
    Weights below the threshold keep their values, so the controller may also lower the thresholds again.

    **Export.** :meth:`finalize` returns a deep copy with Ŵ baked in and the parametrizations removed (plain
    ``weight`` parameters, original names); :meth:`export_densities` writes the realised per-layer densities as
    JSON for a later ``distribution="str_induced"`` run; :meth:`export_masks` writes the masks (Ŵ ≠ 0) for
    ``StaticSparsity(distribution="from_mask")``.

    Args:
        density: overall density of the ER support M_ER (upstream ``er_sparse_init``), in (0, 1]. With
            ``str_induced`` it may be ``None``: the file's densities are then used as they are; otherwise they are
            rescaled by one factor so that Σ d_l·n_l = density·N, layers that would exceed 1 becoming dense and
            their surplus going to the others (upstream divided by α = total / er_sparse_init instead, and read
            sparsity percentages as densities).
        distribution: layer-wise rule of the support: ``uniform``, ``er``, ``erk`` (``redistribute=False`` gives
            upstream STR's clamped ERK), ``balanced``, ``pyramidal``, ``custom`` or ``str_induced`` (per-layer
            densities from ``densities_file``, written by :meth:`export_densities` of an earlier run). Upstream
            names such as ``ERK`` and ``str-induced-er`` are accepted.
        s_init: initial value of every threshold parameter s (STR's ``sInit``); must be finite. STR's configs use
            −200 (g ≈ 0). Upstream's default of 100 (g = 1) zeroes every weight; a value that does so raises at
            ``setup``.
        per_channel: one threshold per output channel instead of one per layer.
        sparse_function: g: ``"sigmoid"`` (STR) or ``"identity"`` (the raw s, floored at 0, so a negative s
            thresholds nothing). Other names raise (upstream crashed later, in ``forward``).
        densities_file: the JSON file of ``str_induced`` (only with that distribution). It is read at every
            ``setup``, resumes included.
        target_density: final realised density of Ŵ the controller steers to, in (0, density]; ``None`` (default)
            leaves the thresholds to STR alone.
        target_schedule: path of the controller's target: ``cosine``, ``linear`` or ``constant``.
        target_start: fraction of training steps at which steering starts, in [0, 1).
        target_end: fraction of training steps at which the target is reached, in (target_start, 1].
        log_thresholds: log g(s) per layer (``str/threshold/<fqn>``, the mean for per-channel thresholds).
        densities_out: when set, :meth:`export_densities` writes there at the end of training (as upstream STR
            wrote its per-layer sparsity file), e.g. for a later ``str_induced`` run from the command line.
        masks_out: when set, :meth:`export_masks` (Ŵ ≠ 0) writes there at the end of training.
        sampling: see :class:`~er_lightning.callbacks.base.SparsityCallback` (also ``seed``, ``include``,
            ``exclude``, ``embeddings``, ``dense_first_layer``, ``dense_last_layer``, ``redistribute``, ``power_scale``,
            ``custom_densities``, ``flow_preservation``, ``ortho_repair``, ``ortho_steps``, ``ortho_lr``,
            ``rezero_every_step``, ``verify_masks``, ``log_layer_densities``).
        init: as the base class, plus ``"kaiming_normal"``: re-draw the masked weights from N(0, 2 / fan_in)
            (STR's builder: ``kaiming_normal``, ``fan_in``, ``relu``; no density rescaling) from a seeded
            generator, before the mask is applied.

    Logged (every logger, rank zero, at train start and every epoch end): ``sparsity/density_global`` and
    ``str/density_global`` (realised density of Ŵ over the masked weights), ``str/support_density_global`` (M_ER),
    ``str/threshold/<fqn>`` (g(s)), with ``log_layer_densities`` also ``sparsity/density/<fqn>`` (realised), and
    with the controller ``str/target_density`` and ``str/control_shift``.

    Raises:
        ValueError: unknown distribution or sparse function, non-finite ``s_init``, ``densities_file`` missing or
            given without ``str_induced``, ``density=None`` without ``str_induced``, bad controller arguments. At
            ``setup``: a densities file that does not match the model (missing/extra names listed), a target above
            the support's density, or an ``s_init`` that zeroes every weight.

    Example:
        >>> import pytorch_lightning as pl
        >>> cb = SoftThreshold(density=0.3, distribution="balanced", redistribute=False, s_init=-200)
        >>> trainer = pl.Trainer(max_epochs=100, callbacks=[cb])
        >>> # trainer.fit(SparseLightningModule("resnet18", model_kwargs={"classifier": "conv1x1"}), datamodule=...)
        >>> # plain = cb.finalize(module); cb.export_densities("str_densities.json")
    """

    SUPPORTS_SPARSE_COMPUTE = False  # learned masks live in a parametrization; export with to_sparse

    EXTRA_DISTRIBUTIONS: tuple[str, ...] = ("str_induced",)
    TOPOLOGY_FIGURES = True

    def __init__(
        self,
        density: Density | None = 0.1,
        distribution: STRDistribution = "erk",
        s_init: float = -200.0,
        per_channel: bool = False,
        sparse_function: SparseFunction = "sigmoid",
        densities_file: str | None = None,
        target_density: Density | None = None,
        target_schedule: TargetSchedule = "cosine",
        target_start: float = 0.0,
        target_end: float = 1.0,
        log_thresholds: bool = True,
        densities_out: str | None = None,
        masks_out: str | None = None,
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
        init: Literal["default", "he_sparse", "looks_linear", "kaiming_normal"] = "default",
        flow_preservation: bool = False,
        ortho_repair: bool = False,
        ortho_steps: int = 1000,
        ortho_lr: float = 1e-2,
        rezero_every_step: bool = False,
        verify_masks: bool = False,
        log_layer_densities: bool = False,
    ) -> None:
        distribution = STR_DISTRIBUTION_ALIASES.get(distribution, distribution)
        if init not in (*INIT_METHODS, "kaiming_normal"):  # before the base class, which knows fewer
            raise ValueError(f"unknown init {init!r}; valid: {[*INIT_METHODS, 'kaiming_normal']}")
        if density is None and distribution != "str_induced":
            raise ValueError(
                f"density=None is only allowed with distribution='str_induced' (use the file's densities as they "
                f"are), got distribution={distribution!r}; give the ER support's density in (0, 1]"
            )
        super().__init__(
            density=1.0 if density is None else density,
            distribution=distribution,
            sampling=sampling,
            seed=seed,
            include=include,
            exclude=exclude,
            embeddings=embeddings,
            dense_first_layer=dense_first_layer,
            dense_last_layer=dense_last_layer,
            redistribute=redistribute,
            power_scale=power_scale,
            custom_densities=custom_densities,
            init="default" if init == "kaiming_normal" else init,
            flow_preservation=flow_preservation,
            ortho_repair=ortho_repair,
            ortho_steps=ortho_steps,
            ortho_lr=ortho_lr,
            rezero_every_step=rezero_every_step,
            verify_masks=verify_masks,
            log_layer_densities=log_layer_densities,
        )
        self.density: float | None = None if density is None else self.density  # type: ignore[assignment]
        if not _finite(s_init):
            raise ValueError(f"s_init must be a finite number, got {s_init!r}; STR's configs use -200")
        check_bool(per_channel, "per_channel")
        self.sparse_function: SparseFunction = check_sparse_function(sparse_function)
        if self.distribution == "str_induced":
            if not densities_file:
                raise ValueError(
                    "distribution='str_induced' needs densities_file: a JSON file written by "
                    "SoftThreshold.export_densities of an earlier STR run"
                )
        elif densities_file is not None:
            raise ValueError(
                f"densities_file is only read with distribution='str_induced', got distribution="
                f"{self.distribution!r}; remove densities_file or set distribution='str_induced'"
            )
        if target_density is not None:
            if not _finite(target_density) or not 0.0 < target_density <= 1.0:
                raise ValueError(f"target_density must be a number in (0, 1] or None, got {target_density!r}")
            if self.density is not None and target_density > self.density:
                raise ValueError(
                    f"target_density={target_density} exceeds the ER support's density={self.density}: Ŵ is zero "
                    "outside the support, so the target cannot be reached; lower target_density or raise density"
                )
        if target_schedule not in ("cosine", "linear", "constant"):
            raise ValueError(
                f"target_schedule must be 'cosine', 'linear' or 'constant', got {target_schedule!r}"
            )
        if not (_finite(target_start) and _finite(target_end) and 0.0 <= target_start < target_end <= 1.0):
            raise ValueError(
                "target_start and target_end are fractions of the training steps with 0 <= target_start < "
                f"target_end <= 1, got target_start={target_start!r}, target_end={target_end!r}"
            )
        self.s_init = float(s_init)
        self.per_channel = per_channel
        self.densities_file = densities_file
        self.target_density = None if target_density is None else float(target_density)
        if self.target_density is not None:
            self.step_unit = StepUnitGuard("SoftThreshold", "target_density's schedule")
        self.target_schedule: TargetSchedule = target_schedule
        self.target_start = float(target_start)
        self.target_end = float(target_end)
        self.log_thresholds = log_thresholds
        self.densities_out = densities_out
        self.masks_out = masks_out
        self.weight_init = init

        #: original FQN -> (module, tensor name, parametrization), in mask order.
        self._layers: dict[str, tuple[nn.Module, str, SoftThresholdParametrization]] = {}
        #: realised density of Ŵ when training started (the controller's d_0); saved in checkpoints.
        self.start_density: float | None = None
        self._last_control: dict[str, float] = {}

    # ------------------------------------------------------------------ config and masks
    @override
    def mask_config(self) -> dict[str, Any]:
        config = super().mask_config()
        config.update({"sparse_function": self.sparse_function, "per_channel": self.per_channel})
        return config

    @override
    def compute_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, shapes: Mapping[str, Sequence[int]]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """ER support masks; ``str_induced`` reads (and rescales) per-layer densities from ``densities_file``."""
        if self.distribution != "str_induced":
            return super().compute_masks(trainer, pl_module, shapes)
        assert self.densities_file is not None
        densities = load_densities(self.densities_file, shapes)
        if self.density is not None:
            densities = rescale_densities(shapes, densities, self.density)
        empty = [n for n, d in densities.items() if d == 0.0]
        if empty:
            rank_zero_warn(f"SoftThreshold: str_induced densities leave layers {empty} with no weight at all")
        return densities, sample_masks(shapes, densities, seed=self.seed, sampling=self.sampling)

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        again = self.masked is not None and self._module_id == id(pl_module)
        if not again:
            present = [fqn for fqn, *_ in find_soft_thresholds(pl_module)]
            if present:
                raise RuntimeError(
                    f"the model already carries soft-threshold parametrizations on {present} (from another "
                    "SoftThreshold callback). Use a fresh model, or SoftThreshold.finalize(model) to get a plain one"
                )
            self.refuse_shared_(pl_module, self.select(pl_module))
            stacked = [
                n
                for n in self.select(pl_module)
                if n.startswith("parametrizations.") or ".parametrizations." in n
            ]
            if stacked:
                raise ValueError(
                    f"SoftThreshold cannot stack on tensors that are already parametrized: {stacked}. Remove those "
                    "parametrizations (torch.nn.utils.parametrize.remove_parametrizations) or exclude the tensors"
                )
        super().setup(trainer, pl_module, stage)  # at the first fit, init_weights_ and zeroing (once)
        if again:
            return
        assert self.masked is not None
        modules = dict(pl_module.named_modules())
        self._layers = {}
        for fqn in self.masked.names:
            mod_name, _, tensor_name = fqn.rpartition(".")
            module = modules[mod_name]
            p = attach_soft_threshold_(
                module,
                tensor_name,
                s_init=self.s_init,
                per_channel=self.per_channel,
                sparse_function=self.sparse_function,
            )
            self._layers[fqn] = (module, tensor_name, p)
        kept = sum(self._effective_counts().values())
        if kept == 0:
            g = float(self._layers[self.masked.names[0]][2].g().detach().reshape(-1)[0])
            raise ValueError(
                f"with s_init={self.s_init} the threshold g(s_init)={g:.6g} zeroes every weight, so nothing can "
                "train (upstream STR's default of 100 does this); use a much lower s_init (STR's configs use -200)"
            )
        if self.target_density is not None:
            support = self.masked.global_density()
            if self.target_density > support + 1e-12:
                raise ValueError(
                    f"target_density={self.target_density} exceeds the ER support's realised density {support:.6f}; "
                    "lower target_density or use a denser support"
                )

    @override
    def init_weights_(self, pl_module: pl.LightningModule) -> None:
        """``weight_init="kaiming_normal"`` (STR's init), then the base class's optional sparse init."""
        if self.weight_init == "kaiming_normal":
            self._kaiming_normal_(pl_module)
        super().init_weights_(pl_module)

    @torch.no_grad()
    def _kaiming_normal_(self, pl_module: pl.LightningModule) -> None:
        assert self.masked is not None
        params = original_named_parameters(pl_module)  # before or after the thresholds attach
        for index, name in enumerate(self.masked.names):
            weight = params[name]
            if weight.dim() < 2:
                continue
            fan_in = weight[0].numel()
            gen = layer_generator((self.seed + _KAIMING_STREAM) % (1 << 64), index)
            sample = torch.randn(tuple(weight.shape), generator=gen, dtype=torch.float32)
            weight.copy_(sample * math.sqrt(2.0 / fan_in))

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masked is None:
            raise RuntimeError(f"{type(self).__name__}.setup did not run before fit")
        # The masked weights are now <module>.parametrizations.<name>.original; masks keep the original FQNs.
        self._rebind_parametrized(pl_module, "soft-threshold parametrization")
        self.masked.apply_()
        if self.verify_masks:
            verify_masks_agree(self.masked.masks, trainer.strategy.root_device)
        self.hook_manual_optimizers_(trainer, pl_module)
        in_optimizer = {id(p) for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]}
        untrained = [fqn for fqn, (_, _, p) in self._layers.items() if id(p.threshold) not in in_optimizer]
        if untrained:
            rank_zero_warn(
                f"SoftThreshold: the thresholds of {untrained} are in no optimizer, so they will not be trained. "
                "Build the optimizer in configure_optimizers from the parameters present at that time"
            )
        if self.target_density is not None and not math.isfinite(float(trainer.estimated_stepping_batches)):
            raise ValueError(
                "target_density needs a finite run length to follow its schedule; set trainer.max_epochs or "
                "trainer.max_steps"
            )
        if self.step_unit is not None:
            self.step_unit.fit_start(trainer, pl_module)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.masked is not None
        self._rebind_parametrized(
            pl_module, "soft-threshold parametrization"
        )  # after the module's on_fit_start
        if self.start_density is None:
            self.start_density = self.effective_global_density()
        self.log_densities(trainer, setup=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        extra: dict[str, float] = {}
        if self.target_density is not None:
            extra = self.steer_(trainer)
        self.refresh_flops_()  # the thresholds move the realised masks: recount at epoch ends
        self.log_densities(trainer, extra=extra)
        super().on_train_epoch_end(trainer, pl_module)

    @override
    def current_masks(self) -> dict[str, Tensor]:
        """Where Ŵ is nonzero: the weights the forward computes with."""
        return self.effective_masks()

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for out in (self.densities_out, self.masks_out):
            if out and rank_zero_only.rank == 0:
                os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        if self.densities_out:
            self.export_densities(self.densities_out)
        if self.masks_out:
            self.export_masks(self.masks_out)

    # ------------------------------------------------------------------ measurements
    @torch.no_grad()
    def _effective_counts(self) -> dict[str, int]:
        if not self._layers:
            return {}
        counts = [torch.count_nonzero(getattr(m, t)) for m, t, _ in self._layers.values()]
        return dict(zip(self._layers, (int(c) for c in torch.stack(counts).tolist())))

    def effective_densities(self) -> dict[str, float]:
        """Per-layer realised density of Ŵ (fraction of non-zero entries), keyed by original FQN."""
        assert self.masked is not None
        return {n: k / self.masked.masks[n].numel() for n, k in self._effective_counts().items()}

    def effective_global_density(self) -> float:
        """Realised density of Ŵ over every masked weight together."""
        assert self.masked is not None
        counts = self._effective_counts()
        total = sum(self.masked.masks[n].numel() for n in counts)
        return sum(counts.values()) / max(total, 1)

    @torch.no_grad()
    def thresholds(self) -> dict[str, Tensor]:
        """Current g(s) per layer (detached copies; shape of s), keyed by original FQN."""
        return {fqn: p.g().detach().clone() for fqn, (_, _, p) in self._layers.items()}

    @torch.no_grad()
    def effective_masks(self) -> dict[str, Tensor]:
        """Per-layer bool masks of the entries in use (Ŵ ≠ 0), on the CPU, keyed by original FQN."""
        return {fqn: (getattr(m, t) != 0).cpu() for fqn, (m, t, _) in self._layers.items()}

    # ------------------------------------------------------------------ the controller
    def target_at(self, trainer: pl.Trainer) -> float | None:
        """The controller's target for the current step, or ``None`` (no controller, or before ``target_start``)."""
        if self.target_density is None or self.start_density is None:
            return None
        total = float(trainer.estimated_stepping_batches)
        progress = trainer.global_step / total if total > 0 else 1.0
        if progress < self.target_start:
            return None
        return scheduled_density(
            progress,
            self.start_density,
            self.target_density,
            self.target_schedule,
            self.target_start,
            self.target_end,
        )

    @torch.no_grad()
    def steer_(self, trainer: pl.Trainer) -> dict[str, float]:
        """Shift every threshold by one δ so the realised density of Ŵ matches the schedule now (in place).

        Every rank computes δ from identical weights; rank 0's value is broadcast anyway, so all ranks apply the
        same shift. Returns the metrics to log (empty before ``target_start``).
        """
        target = self.target_at(trainer)
        if target is None or self.masked is None:
            return {}
        crit = torch.cat(
            [
                critical_shifts(module.parametrizations[t].original, layer.threshold, self.sparse_function)
                for module, t, layer in self._layers.values()
            ]
        )
        k = round(target * crit.numel())
        shift = shift_for_count(crit, k)
        if is_distributed():
            value = torch.tensor([shift], dtype=torch.float64, device=trainer.strategy.root_device)
            dist.broadcast(value, src=0)
            shift = float(value.item())
        if shift != 0.0:
            for _, _, layer in self._layers.values():
                layer.threshold.add_(shift)
        self._last_control = {"str/target_density": target, "str/control_shift": shift}
        return dict(self._last_control)

    # ------------------------------------------------------------------ logging
    def str_metrics(self) -> dict[str, float]:
        """The scalars this callback logs (see the class docstring); synchronises with the device."""
        assert self.masked is not None
        counts = self._effective_counts()
        numels = {n: self.masked.masks[n].numel() for n in counts}
        realised = sum(counts.values()) / max(sum(numels.values()), 1)
        metrics = {
            "sparsity/density_global": realised,
            "str/density_global": realised,
            "str/support_density_global": self.masked.global_density(),
        }
        if self.log_layer_densities:
            metrics.update({f"sparsity/density/{n}": counts[n] / numels[n] for n in counts})
        if self.log_thresholds and self._layers:
            g = torch.stack([p.g().detach().float().mean() for _, _, p in self._layers.values()]).tolist()
            metrics.update({f"str/threshold/{n}": v for n, v in zip(self._layers, g)})
        return metrics

    @override
    @rank_zero_only
    def log_densities(
        self,
        trainer: pl.Trainer,
        setup: bool = False,
        extra: Mapping[str, float] | None = None,
        step: int | None = None,
    ) -> None:
        if self.masked is None or not trainer.loggers:
            return
        metrics = self.str_metrics()
        if extra:
            metrics.update(extra)
        super().log_densities(trainer, setup=setup, extra=metrics, step=step)

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state:
            state["soft_threshold"] = {"start_density": self.start_density}
        return state

    @override
    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        saved = state_dict.get("soft_threshold", {})
        self.start_density = saved.get("start_density", self.start_density)

    # ------------------------------------------------------------------ export
    def finalize(self, pl_module: nn.Module) -> nn.Module:
        """A deep copy of ``pl_module`` with Ŵ baked into plain ``weight`` parameters (original FQNs).

        The parametrizations are removed with ``leave_parametrized=True``; the copy needs no callback and its
        ``state_dict`` loads into the unparametrized model class. ``pl_module`` itself is left as it is.

        Raises:
            ValueError: ``pl_module`` carries no soft threshold.
        """
        if not any(True for _ in find_soft_thresholds(pl_module)):
            raise ValueError(
                f"{type(pl_module).__name__} carries no soft-threshold parametrization; pass the module this "
                "callback trained (after setup)"
            )
        plain = copy.deepcopy(pl_module)
        remove_soft_thresholds_(plain)
        return plain

    def export_densities(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Write the realised per-layer densities of Ŵ as JSON (written on global rank 0 only) and return them.

        The file holds ``{"format", "version", "densities": {fqn: d}, "global": d, "shapes": {fqn: shape}}`` with
        the original FQNs; ``SoftThreshold(distribution="str_induced", densities_file=path)`` reads it.
        """
        if self.masked is None or not self._layers:
            raise RuntimeError(
                "SoftThreshold.export_densities needs a model set up by this callback (run fit first)"
            )
        densities = self.effective_densities()
        shapes = {n: tuple(self.masked.masks[n].shape) for n in densities}
        if rank_zero_only.rank == 0:
            return save_densities(path, densities, shapes)
        numels = {n: math.prod(s) for n, s in shapes.items()}
        return {
            "densities": densities,
            "global": sum(densities[n] * numels[n] for n in densities) / max(sum(numels.values()), 1),
        }

    def export_masks(
        self, path: str | os.PathLike[str], which: Literal["effective", "support"] = "effective"
    ) -> dict[str, Tensor]:
        """Save masks with :func:`~er_lightning.masking.io.save_masks` (global rank 0 writes) and return them.

        Args:
            path: output file (``torch.save`` of FQN → bool tensor).
            which: ``"effective"``: Ŵ ≠ 0 (the sparse network STR found); ``"support"``: the ER mask M_ER.
        """
        if self.masked is None or not self._layers:
            raise RuntimeError(
                "SoftThreshold.export_masks needs a model set up by this callback (run fit first)"
            )
        if which not in ("effective", "support"):
            raise ValueError(f"which must be 'effective' or 'support', got {which!r}")
        masks = self.effective_masks() if which == "effective" else self.masked.state_masks()
        if rank_zero_only.rank == 0:
            save_masks(masks, path)
        return masks
