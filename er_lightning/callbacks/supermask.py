"""Strong lottery tickets inside a random ER mask: edge-popup scores on frozen random weights (upstream ``ER_SLT``)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import Tensor, nn
from torch.nn.utils import parametrize
from typing_extensions import override

from er_lightning.callbacks.base import Density, Distribution, SparsityCallback, _stream_seed
from er_lightning.callbacks.progress import StepUnitGuard
from er_lightning.masking.dist import verify_masks_agree
from er_lightning.masking.flops import FlopsCount
from er_lightning.masking.supermask import (
    SCORE_INITS,
    WEIGHT_INITS,
    GlobalTopK,
    ScoreInit,
    SupermaskParametrization,
    WeightInit,
    bake_supermasks,
    init_frozen_weights_,
    init_scores,
    kept_count,
)
from er_lightning.masking.targets import original_fqn
from er_lightning.sparsity.anneal import annealed_densities, level_at_step
from er_lightning.sparsity.checks import check_bool, check_density
from er_lightning.sparsity.init import fan_in
from er_lightning.sparsity.sampling import layer_generator

__all__ = ["Supermask"]

# Seed offsets of the frozen-weight init and the score init (mask sampling uses the plain seed).
_WEIGHT_STREAM = 0x5851F42D4C957F2D
_SCORE_STREAM = 0x14057B7EF767814F


class Supermask(SparsityCallback):
    """Train a binary mask over frozen random weights, inside a random ER mask (strong lottery tickets).

    Gadhikar et al., "Why Random Pruning Is All We Need to Start Sparse" (ICML 2023, arXiv:2210.02412), §ER
    strong lottery tickets, using edge-popup (Ramanujan et al., arXiv:1911.13299). Every masked layer ``l``
    (every conv and linear weight by default) computes with the effective weight ``W ⊙ M_ER ⊙ B``:

    * ``W`` is random and frozen (``requires_grad=False``; bit-identical after training), initialised by
      ``weight_init``.
    * ``M_ER`` is a fixed random ER mask of density ``er_density`` per the ``distribution`` rule, drawn by the
      shared engine exactly as :class:`~er_lightning.callbacks.static.StaticSparsity` draws it (same seed and
      arguments give the same masks), zeroed into ``W`` in place, broadcast from rank 0 and kept in this
      callback's checkpoint state.
    * ``B`` is binary: the ``⌊k · n_l⌋`` positions with the largest ``|score|`` *inside* ``M_ER`` (``n_l`` = all
      weights of the layer, so ``k ≤ er_density``; ``k`` is the current kept fraction). Ties are broken by flat
      index, lowest first. With ``scope="global"``, ``⌊k · Σn_l⌋`` positions are chosen over all layers together.
      Scores are trained with a straight-through gradient: ``∂L/∂score = ∂L/∂W_eff · W · sign(score)``.

    Scores are ``nn.Parameter`` objects of a ``torch.nn.utils.parametrize`` module attached in ``setup``, before
    ``configure_optimizers``, so an optimizer over ``self.parameters()`` trains them (named
    ``<layer>.parametrizations.weight.0.scores``; the frozen weight becomes ``<layer>.parametrizations.weight.original``).
    ``on_fit_start`` raises if an optimizer misses a score. With ``freeze_other_parameters`` (default) every other
    parameter is frozen too, as upstream trains the scores only (its BN layers are non-affine).

    Annealing (upstream ``--levels``, ``--anneal``, ``--sparsity_start``): training is split into ``levels``
    equal chunks of optimizer steps (``trainer.global_step`` over ``trainer.estimated_stepping_batches``); level
    ``l`` uses ``k_l`` from :func:`~er_lightning.sparsity.anneal.annealed_densities`, i.e. ``k ← k · b`` with
    ``b = (density / start)^(1/levels)``, clamped to ``er_density`` from above and to ``density`` from below.
    Optimizer state carries across levels, as upstream. With ``restart_lr_each_level`` the LR schedule restarts at
    each level through ``pl_module.reset_lr_schedule(schedule_steps=<level length>)`` when the module has it
    (:class:`~er_lightning.module.SparseLightningModule`); other modules get a warning and keep their schedule.

    Checkpoints: scores and frozen weights are in the model's ``state_dict`` (parametrized names: resume with this
    callback attached); ``M_ER``, ``k`` and the level are in this callback's state. :meth:`bake` returns a plain
    copy whose weights are ``W ⊙ M_ER ⊙ B``, loadable without the callback.

    Logged (rank zero, at train start and every epoch end): ``slt/k``, ``slt/level``, ``slt/flipped`` (fraction of
    all masked entries whose B changed since the previous log), ``sparsity/density_global`` (kept by ``B`` over
    all masked weights), ``slt/er_density_global`` (``M_ER``), and with ``log_layer_densities`` also
    ``sparsity/density/<fqn>`` (B per layer). The setup figure and table show ``M_ER``.

    Args:
        density: final kept fraction ``k`` of every masked layer (upstream ``--sparsity``), in
            (0, ``er_density``].
        er_density: density of the random ER mask (upstream ``--er-init-density``), in (0, 1]. ``1`` is plain
            edge-popup.
        distribution: layer-wise rule for the ER mask: ``erk`` by default, as for every callback (upstream's
            ``uniform`` is what the ``configs/er_slt`` files set), or ``er``, ``balanced``, ``pyramidal``,
            ``custom``; see :class:`~er_lightning.callbacks.base.SparsityCallback`. ``k`` is the
            same in every layer; a layer whose ER mask holds fewer than ``⌊k · n_l⌋`` entries keeps all of them.
        sampling: ``"exact"`` ER masks hold ``round(d_l · n_l)`` entries; ``"bernoulli"`` draws each entry
            (upstream).
        seed: seeds the ER masks, the weight init and the score init (independent streams; never the global RNG).
        scope: ``"layer"`` (upstream) chooses ``⌊k · n_l⌋`` per layer; ``"global"`` chooses ``⌊k · Σn_l⌋`` over all
            masked layers together.
        levels: number of annealing levels (equal chunks of the run), >= 1.
        anneal: anneal ``k`` over the levels; ``False`` keeps ``density`` from the start (levels then only restart
            the LR schedule).
        start: ``k_start`` of the annealing (upstream ``--sparsity_start``), in [``density``, 1].
        restart_lr_each_level: restart the module's LR schedule at every level (upstream restarts its step decay
            every level). Needs ``reset_lr_schedule`` on the module; ignored when ``levels == 1``.
        weight_init: frozen-weight init of the masked layers (and their biases), see
            :func:`~er_lightning.masking.supermask.init_frozen_weights_`; ``"default"`` keeps the model's init.
        scale_fan: divide σ by √``density`` (upstream ``--scale-fan``).
        bias_gain: initial running gain of ``kn-nonzero-bias`` (upstream ``--bfac``), > 0.
        score_init: ``"kaiming_uniform"`` (edge-popup), ``"constant"`` (0.5 everywhere: every score ties, and the
            first ``⌊k · n_l⌋`` support positions in flat order are chosen until the gradients separate them) or
            ``"upstream"`` (constant for convs, Kaiming-uniform for linear layers, as ER_SLT's ResNet-18).
        score_biases: also score and mask the biases of masked layers: each bias keeps its ``⌊k · n_b⌋`` largest
            ``|score|`` on its own (biases have no ER mask). Upstream ranks weight and bias scores together; here the
            weight count per layer stays exactly ``⌊k · n_l⌋``.
        freeze_other_parameters: set ``requires_grad=False`` on every parameter that is not a score (BN affine
            parameters, unscored biases, unmasked layers). ``False`` lets the optimizer train them.
        include: glob patterns of parameter names to mask instead of the default (weights with >= 2 dims only).
        exclude: glob patterns of parameter names to leave unmasked (they stay dense and frozen by default).
        embeddings: also mask embedding tables (see :class:`~er_lightning.callbacks.base.SparsityCallback`).
        dense_first_layer: leave the first masked layer unmasked.
        dense_last_layer: leave the last masked layer unmasked.
        redistribute: see :class:`~er_lightning.callbacks.base.SparsityCallback` (ER mask rule).
        power_scale: ERK exponent (ER mask rule).
        custom_densities: per-layer ER densities for ``distribution="custom"``.
        verify_masks: all-gather ER mask checksums and raise if ranks disagree (debugging).
        log_layer_densities: also log the per-layer kept fraction of ``B``.

    Raises:
        ValueError: ``density > er_density``, a fraction outside (0, 1], ``levels < 1``, ``start < density``,
            an unknown ``weight_init``/``score_init``/``scope``/``distribution``; at setup, a model with no
            maskable parameter, or a target with fewer than 2 dims.

    Example:
        >>> import pytorch_lightning as pl
        >>> from er_lightning import SparseLightningModule
        >>> slt = Supermask(density=0.2, er_density=0.5, levels=5, seed=2)
        >>> trainer = pl.Trainer(max_epochs=500, callbacks=[slt])
        >>> model = SparseLightningModule("resnet18", model_kwargs={"bn_affine": False, "bias": True})
        >>> # trainer.fit(model, datamodule=...); plain = slt.bake(model)
    """

    SUPPORTS_SPARSE_COMPUTE = False  # learned masks live in a parametrization; export with to_sparse

    FORMAT_VERSION = 1

    def __init__(
        self,
        density: Density = 0.2,
        er_density: Density = 0.5,
        distribution: Distribution = "erk",
        sampling: Literal["exact", "bernoulli"] = "exact",
        seed: int = 0,
        scope: Literal["layer", "global"] = "layer",
        levels: int = 1,
        anneal: bool = True,
        start: float = 0.6,
        restart_lr_each_level: bool = True,
        weight_init: WeightInit = "kn-zero-bias",
        scale_fan: bool = False,
        bias_gain: float = 0.05,
        score_init: ScoreInit = "kaiming_uniform",
        score_biases: bool = False,
        freeze_other_parameters: bool = True,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        embeddings: bool = False,
        dense_first_layer: bool = False,
        dense_last_layer: bool = False,
        redistribute: bool = True,
        power_scale: float = 1.0,
        custom_densities: dict[str, float] | None = None,
        verify_masks: bool = False,
        log_layer_densities: bool = False,
    ) -> None:
        er = check_density(er_density, "er_density")
        super().__init__(
            density=er,  # the engine's hard mask is M_ER: its ``density`` is the ER density
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
            verify_masks=verify_masks,
            log_layer_densities=log_layer_densities,
        )
        k_final = check_density(density, "density")
        if scope not in ("layer", "global"):
            raise ValueError(f"scope must be 'layer' or 'global', got {scope!r}")
        if weight_init not in WEIGHT_INITS:
            raise ValueError(f"unknown weight_init {weight_init!r}; valid: {list(WEIGHT_INITS)}")
        if score_init not in SCORE_INITS:
            raise ValueError(f"unknown score_init {score_init!r}; valid: {list(SCORE_INITS)}")
        if (
            isinstance(bias_gain, bool)
            or not isinstance(bias_gain, (int, float))
            or not math.isfinite(bias_gain)
            or bias_gain <= 0
        ):
            raise ValueError(f"bias_gain must be a finite number > 0, got {bias_gain!r}")
        for flag, value in (
            ("anneal", anneal),
            ("restart_lr_each_level", restart_lr_each_level),
            ("scale_fan", scale_fan),
            ("score_biases", score_biases),
            ("freeze_other_parameters", freeze_other_parameters),
        ):
            check_bool(value, flag)
        # Checks density <= er_density, start, levels (and raises with the allowed ranges).
        self.schedule: list[float] = annealed_densities(k_final, er, levels, start=start, anneal=anneal)
        self.er_density = er
        self.final_density = k_final
        self.scope = scope
        self.levels = levels
        self.anneal = anneal
        self.start = float(start)
        self.restart_lr_each_level = restart_lr_each_level
        self.weight_init = weight_init
        self.scale_fan = scale_fan
        self.bias_gain = float(bias_gain)
        self.score_init = score_init
        self.score_biases = score_biases
        self.freeze_other_parameters = freeze_other_parameters

        #: Current kept fraction ``k`` and 0-based level (``None`` before training starts).
        self.k: float = self.schedule[0]
        self.level: int | None = None
        self.weight_masks: dict[str, SupermaskParametrization] = {}
        self.bias_masks: dict[str, SupermaskParametrization] = {}
        self.selector: GlobalTopK | None = None
        self._score_names: dict[int, str] = {}
        self._support_counts: dict[str, int] = {}
        self._total_steps: int | None = None
        self._previous: dict[str, Tensor] | None = None
        self._warned_lr = False
        if levels > 1:
            self.step_unit = StepUnitGuard(
                "Supermask", f"levels={levels}: k anneals over equal chunks of the run"
            )

    # ------------------------------------------------------------------ config
    @override
    def mask_config(self) -> dict[str, Any]:
        """ER mask arguments (``er_density`` instead of the engine's ``density``) plus everything defining B."""
        config = super().mask_config()
        config["er_density"] = config.pop("density")
        config.update(
            density=self.final_density,
            scope=self.scope,
            levels=self.levels,
            anneal=self.anneal,
            start=self.start,
            weight_init=self.weight_init,
            scale_fan=self.scale_fan,
            bias_gain=self.bias_gain,
            score_init=self.score_init,
            score_biases=self.score_biases,
            freeze_other_parameters=self.freeze_other_parameters,
        )
        return config

    # ------------------------------------------------------------------ public helpers
    @property
    def scores(self) -> dict[str, nn.Parameter]:
        """Masked weight name (pre-parametrization FQN) → its score parameter."""
        return {n: p.scores for n, p in self.weight_masks.items()}

    def binary_masks(self) -> dict[str, Tensor]:
        """Masked weight name → current B as a bool tensor (no gradient). Computes a top-k per layer."""
        return {n: p.selected() for n, p in self.weight_masks.items()}

    def bake(self, pl_module: nn.Module) -> nn.Module:
        """A plain deep copy of ``pl_module`` (or any module holding the parametrized layers) with weights
        ``W ⊙ M_ER ⊙ B`` and no parametrizations; it loads into the bare architecture without this callback.

        Example:
            >>> # plain = slt.bake(model); torch.save(plain.state_dict(), "ticket.pt")
        """
        return bake_supermasks(pl_module)

    # ------------------------------------------------------------------ setup
    def _owners(
        self, pl_module: pl.LightningModule, names: Sequence[str]
    ) -> dict[str, tuple[nn.Module, str]]:
        self.refuse_shared_(pl_module, names)
        owners: dict[str, tuple[nn.Module, str]] = {}
        params = dict(pl_module.named_parameters())
        for name in names:
            if name != original_fqn(name):
                raise ValueError(
                    f"{name!r} is parametrized already; Supermask attaches its own parametrization to plain weights "
                    "(do not combine it with another callback that parametrizes the same layers)"
                )
            if params[name].dim() < 2:
                raise ValueError(
                    f"Supermask masks weights with >= 2 dims, but {name!r} has shape {tuple(params[name].shape)}; "
                    "use score_biases=True to score biases, and include/exclude to pick conv/linear weights"
                )
            module_name, _, tensor_name = name.rpartition(".")
            owners[name] = (pl_module.get_submodule(module_name), tensor_name)
        return owners

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.masked is not None:
            if self._module_id == id(pl_module):
                # another stage: the parametrizations are in place; the base class still does the fit-time
                # weight init once if validate/test came before the first fit
                super().setup(trainer, pl_module, stage)
                return
            raise RuntimeError(
                "this Supermask instance is attached to another module already; use one callback per model"
            )
        owners = self._owners(pl_module, self.select(pl_module))
        super().setup(
            trainer, pl_module, stage
        )  # ER masks drawn, broadcast from rank 0; at fit, W initialised (init_weights_) and zeroed in place
        self._attach(pl_module, owners)

    @override
    def init_weights_(self, pl_module: pl.LightningModule) -> None:
        """Initialise the frozen weights (and biases) by ``weight_init``, before or after the scores attach."""
        if self.weight_init != "default":
            assert self.masked is not None
            pairs = []
            for name in self.masked.names:
                module_name, _, tensor_name = name.rpartition(".")
                module = pl_module.get_submodule(module_name)
                has_bias = isinstance(
                    getattr(module, "bias", None), nn.Parameter
                ) or parametrize.is_parametrized(module, "bias")
                pairs.append((_stored(module, tensor_name), _stored(module, "bias") if has_bias else None))
            init_frozen_weights_(
                pairs,
                self.weight_init,
                seed=_stream_seed(self.seed, _WEIGHT_STREAM),
                scale=1.0 / math.sqrt(self.final_density) if self.scale_fan else 1.0,
                bias_gain=self.bias_gain,
            )
        super().init_weights_(pl_module)

    @staticmethod
    def _bias_of(module: nn.Module) -> nn.Parameter | None:
        bias = getattr(module, "bias", None)
        return bias if isinstance(bias, nn.Parameter) else None

    def _score_kind(self, module: nn.Module) -> Literal["kaiming_uniform", "constant"]:
        if self.score_init == "upstream":
            return "kaiming_uniform" if isinstance(module, nn.Linear) else "constant"
        return "kaiming_uniform" if self.score_init == "kaiming_uniform" else "constant"

    def _attach(self, pl_module: pl.LightningModule, owners: Mapping[str, tuple[nn.Module, str]]) -> None:
        assert self.masked is not None
        self.selector = GlobalTopK() if self.scope == "global" else None
        for index, name in enumerate(self.masked.names):
            module, tensor_name = owners[name]
            weight = getattr(module, tensor_name)
            weight.requires_grad_(False)
            kind = self._score_kind(module)
            gen = layer_generator(_stream_seed(self.seed, _SCORE_STREAM), index)
            fan = fan_in(weight.shape)
            scores = init_scores(weight.shape, kind, generator=gen, fan=fan).to(weight.device, weight.dtype)
            p = SupermaskParametrization(scores, support=self.masked.masks[name], selector=self.selector)
            parametrize.register_parametrization(module, tensor_name, p, unsafe=True)
            self.weight_masks[name] = p
            bias = self._bias_of(module)
            if self.score_biases and bias is not None:
                bias.requires_grad_(False)
                bias_scores = init_scores(bias.shape, kind, generator=gen, fan=fan, bias=True)
                bp = SupermaskParametrization(bias_scores.to(bias.device, bias.dtype))
                parametrize.register_parametrization(module, "bias", bp, unsafe=True)
                self.bias_masks[name] = bp
        score_ids = {id(p.scores) for p in (*self.weight_masks.values(), *self.bias_masks.values())}
        self._score_names = {id(p): n for n, p in pl_module.named_parameters() if id(p) in score_ids}
        if self.freeze_other_parameters:
            for p in pl_module.parameters():
                if id(p) not in score_ids:
                    p.requires_grad_(False)
        self._support_counts = {n: kept for n, (kept, _) in self.masked.counts().items()}
        self._apply_fraction(self.k)

    def _apply_fraction(self, k: float) -> None:
        """Set the kept counts of every parametrization for kept fraction ``k``."""
        self.k = k
        empty = []
        if self.selector is not None:
            total = self.selector.numel()
            self.selector.keep = min(kept_count(k, total), sum(self._support_counts.values()))
        for name, p in self.weight_masks.items():
            p.keep = min(kept_count(k, p.scores.numel()), self._support_counts[name])
            if self.selector is None and p.keep == 0:
                empty.append(name)
        for p in self.bias_masks.values():
            p.keep = kept_count(k, p.scores.numel())
        if empty:
            rank_zero_warn(
                f"Supermask: at kept fraction {k:.5f} the layers {empty} keep no weight (⌊k·n⌋ = 0 or an empty ER "
                "mask); their outputs are constant. Raise density/er_density or leave them dense (exclude)."
            )

    # ------------------------------------------------------------------ placement and checks
    def _place(self, pl_module: pl.LightningModule) -> None:
        """Point the engine at the current weight objects and keep each support on its weight's device."""
        if self.masked is None:
            return
        self._rebind_parametrized(pl_module, "score parametrization")
        for name, p in self.weight_masks.items():
            p.support = self.masked.masks[name]
        if self.selector is not None:
            self.selector.invalidate()

    def _check_optimizers(self, trainer: pl.Trainer) -> None:
        trained = {id(p) for opt in trainer.optimizers for group in opt.param_groups for p in group["params"]}
        missing = [name for pid, name in self._score_names.items() if pid not in trained]
        if missing:
            raise RuntimeError(
                f"Supermask: {len(missing)} of {len(self._score_names)} score parameters are in no optimizer "
                f"param group (e.g. {missing[:3]}). Supermask adds the scores in setup, before configure_optimizers; "
                "build the optimizer there from self.parameters() (or the parameters with requires_grad=True) "
                "at call time, not from a list made in __init__"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.masked is None:
            raise RuntimeError("Supermask.setup did not run before fit")
        self._place(pl_module)
        self._check_optimizers(trainer)
        if self.verify_masks:
            verify_masks_agree(self.masked.masks, trainer.strategy.root_device)
        if self.step_unit is not None:
            self.step_unit.fit_start(trainer, pl_module)
        if self.selector is not None:
            # fused optimizer steps leave the scores' version counters alone: recompute B after every step
            self._remove_step_hooks()
            self._step_hooks.extend(self.selector.invalidate_after_steps(opt) for opt in trainer.optimizers)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._place(pl_module)

    @override
    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._place(pl_module)

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._place(pl_module)

    # ------------------------------------------------------------------ levels
    def level_bounds(self, level: int) -> tuple[int, int]:
        """First and one-past-last optimizer step of ``level`` (needs the run length, known at train start)."""
        if self._total_steps is None:
            raise RuntimeError("the run length is known from on_train_start on")
        total, n = self._total_steps, self.levels
        return -(-level * total // n), -(-(level + 1) * total // n)

    def _enter_level_if_due(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        level = (
            0 if self.levels == 1 else level_at_step(trainer.global_step, self._total_steps or 1, self.levels)
        )
        if level == self.level:
            return
        previous, self.level = self.level, level
        self._apply_fraction(self.schedule[level])
        self.refresh_flops_()
        if (
            previous is not None
        ):  # a new level changes B: refresh the figures (the first level: at train start)
            self.log_densities(trainer)
        rank_zero_info(
            f"Supermask: level {level + 1}/{self.levels} from step {trainer.global_step}, k = {self.k:.5f}"
        )
        if not self.restart_lr_each_level or self.levels == 1:
            return
        reset = getattr(pl_module, "reset_lr_schedule", None)
        if callable(reset):
            first, end = self.level_bounds(level)
            reset(schedule_steps=max(end - first, 1))
        elif not self._warned_lr:
            self._warned_lr = True
            rank_zero_warn(
                f"Supermask: restart_lr_each_level=True but {type(pl_module).__name__} has no reset_lr_schedule(); "
                "the LR schedule is not restarted at each level. Use SparseLightningModule, implement "
                "reset_lr_schedule(schedule_steps), or set restart_lr_each_level=False"
            )

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._place(pl_module)  # after the module's own on_fit_start: a layer replaced there raises
        if self.levels > 1:
            total = trainer.estimated_stepping_batches
            if not math.isfinite(total):
                raise ValueError(
                    f"Supermask with levels={self.levels} splits the run into equal chunks and needs its length; "
                    "set trainer.max_epochs or trainer.max_steps"
                )
            total = int(total)
            if self._total_steps is not None and self._total_steps != total:
                rank_zero_warn(
                    f"Supermask: the run length changed from {self._total_steps} to {total} optimizer steps since "
                    "the checkpoint; level boundaries move accordingly"
                )
            if total < self.levels:
                rank_zero_warn(
                    f"Supermask: {total} optimizer steps for {self.levels} levels; some levels get none"
                )
            self._total_steps = total
        self._enter_level_if_due(trainer, pl_module)
        super().on_train_start(trainer, pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self._enter_level_if_due(trainer, pl_module)
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.refresh_flops_()  # B follows the trained scores: recount at epoch ends
        self.log_densities(trainer)
        super().on_train_epoch_end(trainer, pl_module)

    # ------------------------------------------------------------------ FLOPs accounting
    @override
    def current_masks(self) -> dict[str, Tensor]:
        """B inside M_ER: the weights the forward computes with."""
        return self.binary_masks()

    @override
    def density_targets(self) -> dict[str, float]:
        """The kept fraction k of the current level, for every layer."""
        assert self.masked is not None
        return dict.fromkeys(self.masked.names, self.k)

    @override
    def weight_gradient_flops(self, flops: FlopsCount, step: int) -> float | None:
        """Edge-popup trains every score inside the ER support: the weight gradient is needed on all of M_ER."""
        return flops.with_kept(self._support_counts).sparse

    # ------------------------------------------------------------------ logging
    @override
    @rank_zero_only
    def log_densities(
        self,
        trainer: pl.Trainer,
        setup: bool = False,
        extra: Mapping[str, float] | None = None,
        step: int | None = None,
    ) -> None:
        """Log ``slt/k``, ``slt/level``, ``slt/flipped``, the kept fraction of B (global, optionally per layer)."""
        if self.masked is None or not trainer.loggers:
            return
        current = self.binary_masks()
        kept = dict(zip(current, torch.stack([b.sum() for b in current.values()]).tolist()))
        total = sum(b.numel() for b in current.values())
        metrics: dict[str, float] = {
            "sparsity/density_global": sum(kept.values()) / total,
            "slt/er_density_global": self.masked.global_density(),
            "slt/k": self.k,
            "slt/level": float(self.level if self.level is not None else 0),
        }
        if self.log_layer_densities:
            metrics.update({f"sparsity/density/{n}": kept[n] / b.numel() for n, b in current.items()})
        if self._previous is not None:
            flipped = sum(int((b ^ self._previous[n].to(b.device)).sum()) for n, b in current.items())
            metrics["slt/flipped"] = flipped / total
        self._previous = current
        if extra:
            metrics.update(extra)
        super().log_densities(trainer, setup=setup, extra=metrics, step=step)

    # ------------------------------------------------------------------ checkpoint state
    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if state:
            state.update(level=self.level, k=self.k, total_steps=self._total_steps)
        return state

    @override
    def load_extra_state(self, state_dict: Mapping[str, Any]) -> None:
        assert self.masked is not None
        for name, p in self.weight_masks.items():
            p.support = self.masked.masks[name]
        self._support_counts = {n: kept for n, (kept, _) in self.masked.counts().items()}
        self.level = state_dict.get("level")
        self._total_steps = state_dict.get("total_steps")
        k = state_dict.get("k")
        if k is None:
            k = self.schedule[self.level] if self.level is not None else self.schedule[0]
        self._apply_fraction(float(k))
        if self.selector is not None:
            self.selector.invalidate()


def _stored(module: nn.Module, tensor_name: str) -> nn.Parameter:
    """The parameter behind ``module.<tensor_name>``: itself, or ``parametrizations.<name>.original``."""
    if parametrize.is_parametrized(module, tensor_name):
        return module.parametrizations[tensor_name].original
    return getattr(module, tensor_name)
