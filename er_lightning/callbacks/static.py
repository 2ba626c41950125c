"""Fixed-mask sparse training: random ER masks, and layer ratios taken from pruning-at-initialisation scores.

:class:`StaticSparsity` trains with a mask drawn once at ``setup`` and never changed (upstream ``--sparse --fix``).
The per-layer densities come either from a density rule (``uniform``, ``er``, ``erk``, ``balanced``,
``pyramidal``, ``custom``) or from a *source mask*: a pruning-at-initialisation criterion (``snip``, ``grasp``,
``synflow``, ``magnitude``) run at the requested overall density, or a saved mask file (``from_mask``, e.g. a level
of :class:`~er_lightning.callbacks.imp.IterativeMagnitudePruning`). For a source, ``placement`` chooses between
the paper's "ER with these ratios" (``"random"``: ER_snip, ER_synflow, ER_imp) and the source's own positions
(``"scores"``: the SNIP/SynFlow/IMP baselines). This is the ratios × placement grid of Gadhikar et al. (2023).
"""

from __future__ import annotations

import copy
import itertools
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from er_lightning.callbacks.base import Density, Distribution, SparsityCallback
from er_lightning.callbacks.feedback import progress_reporter
from er_lightning.masking.io import load_masks
from er_lightning.sparsity.checks import check_int
from er_lightning.sparsity.progress import reporting
from er_lightning.sparsity.sampling import sample_masks
from er_lightning.sparsity.scores import BatchLoss, prune_at_init

__all__ = ["SOURCE_DISTRIBUTIONS", "StaticSparsity", "training_step_loss"]

#: Distributions whose layer-wise densities come from a source mask rather than a density rule.
SOURCE_DISTRIBUTIONS: tuple[str, ...] = ("snip", "grasp", "synflow", "magnitude", "from_mask")
#: The density rules plus the score- and file-derived ratios, checked by LightningCLI at parse time.
StaticDistribution = Literal[Distribution, "snip", "grasp", "synflow", "magnitude", "from_mask"]
#: Sources that read training batches.
_DATA_SOURCES = ("snip", "grasp")


class StaticSparsity(SparsityCallback):
    """Train with a fixed mask: random Erdős–Rényi, or with the layer ratios of a pruning-at-init criterion.

    Gadhikar, Mukherjee and Burkholz, "Why Random Pruning Is All We Need to Start Sparse", ICML 2023,
    arXiv:2210.02412. At ``setup`` the masked parameters (every conv and linear weight by default) get per-layer
    densities and a mask; masked weights are zeroed in place and their gradients are zeroed before every optimizer
    step, so weights and optimizer moments stay exactly zero there. See
    :class:`~er_lightning.callbacks.base.SparsityCallback` for the arguments shared by every mask callback.

    **Where the layer densities come from** (``distribution``):

    * a density rule (``uniform``, ``er``, ``erk``, ``balanced``, ``pyramidal``, ``custom``, or an upstream alias:
      ``ERK`` → ``erk``; ``ER_same_params`` / ``ER_same_params_per_layer`` → ``balanced``; ``pyramid``,
      ``pyramid_sparsity`` → ``pyramidal``; ``ER_init`` → ``uniform``);
    * ``snip``, ``grasp``, ``synflow``, ``magnitude``: the criterion prunes the module at ``setup`` to the overall
      ``density`` with one global threshold (:func:`~er_lightning.sparsity.scores.prune_at_init`), and layer
      ``l`` takes the density that criterion left it, ``k_l / n_l``;
    * ``from_mask``: a saved mask file ``mask_file`` (``{fqn: bool tensor}`` as written by
      :func:`~er_lightning.masking.io.save_masks`, e.g. ``imp_masks/level_10.pt`` of an IMP run); its names and
      shapes must match the masked parameters exactly (differences are listed). ``density`` is not used: the
      file defines it.

    **Where the kept weights are** (``placement``, source distributions only):

    * ``"random"`` (default): a seeded random ER mask with the source's per-layer densities
      (:func:`~er_lightning.sparsity.sampling.sample_masks`): ER_snip, ER_synflow, ER_imp. With
      ``sampling="exact"`` every layer keeps exactly the source's count ``k_l`` at fresh random positions, which is
      the "shuffled mask" control (layer counts kept, structure destroyed; bit-identical to
      :func:`~er_lightning.sparsity.sampling.resample_like` with ``layer_generator(seed, l)``), so no separate
      ``shuffle`` option exists: ``distribution="from_mask", placement="random"`` *is* the shuffled file.
      With ``sampling="bernoulli"`` the counts are Binomial around ``k_l``, as upstream draws its ER masks.
    * ``"scores"``: keep the source mask itself (the SNIP / GraSP / SynFlow / magnitude / file baseline). For a
      density rule there is nothing to keep, so ``placement="scores"`` raises.

    **Scores.** They are computed on the LightningModule itself (names are its FQNs), on an eval-mode copy placed
    on ``trainer.strategy.root_device``, so the module's weights, BN statistics and flags and the global RNG are
    left exactly as they were (the fetching of batches runs under a forked CPU RNG, so data order in training is
    unchanged). **The loss of SNIP/GraSP** is the module's own: by default its ``training_step`` on each batch
    (:func:`training_step_loss`: the module's batch-transfer hooks, then ``training_step(batch, 0)``; its
    ``self.log`` calls are dropped, as the copy has no trainer), so a language model, a detector or any custom
    loss is scored with the loss it trains on. With ``loss_fn`` the loss is ``loss_fn(module(x), y)`` on
    ``(x, y)`` batches instead; that is required under manual optimization, whose ``training_step`` steps the
    optimizers itself. GraSP's temperature divides what the module's ``forward`` returns. SNIP/GraSP average over the
    first ``num_batches`` batches of the training data: ``trainer.datamodule.train_dataloader()`` when a
    datamodule is attached, else the loader given to ``trainer.fit`` or the module's own ``train_dataloader``.
    SynFlow (data-free, ``rounds`` iterative rounds, ``double`` for float64) needs the shape of one input:
    ``input_shape``, else the ``input_shape`` attribute of the module or of its ``model`` backbone (every
    ``er_lightning.models`` network has one), else the first training batch. A module with an ``nn.Embedding`` is
    a token model: SynFlow feeds it token ids of that shape (``(seq_len,)``) with every embedding returning the sum
    of its rows, the all-ones input of a lookup
    (:func:`~er_lightning.sparsity.scores.synflow_scores`). Scoring happens once per fit at
    ``setup``, also when resuming (the checkpoint's masks then replace the result). In stages other than ``fit``
    (``validate``/``test`` of a checkpoint) whose data module cannot give training batches, SNIP/GraSP draw nothing
    and leave the module as loaded (the checkpoint's weights hold their zeros).

    **Several GPUs.** Each rank scores on its own batches, so scores may differ between ranks; the masks of rank 0
    are broadcast to every rank before DDP wraps the model (as for every mask), so all ranks train the same mask.

    Args:
        density: overall fraction kept over the masked parameters, in (0, 1]; the criterion's target for the
            score sources; unused by ``from_mask``.
        distribution: a density rule or alias (see above), or one of ``snip``, ``grasp``, ``synflow``,
            ``magnitude``, ``from_mask``.
        placement: ``"random"`` (ER mask with the source's ratios) or ``"scores"`` (the source's own mask).
        mask_file: path of the mask file for ``distribution="from_mask"`` (and only then).
        num_batches: training batches averaged by SNIP/GraSP, >= 1.
        input_shape: shape of one input sample without the batch dimension, for SynFlow (e.g. ``[3, 32, 32]``).
        rounds: SynFlow prune-rescore rounds, >= 1 (100 in the SynFlow paper).
        double: compute SynFlow in float64 (deep networks can overflow float32).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for SNIP/GraSP on ``(inputs, targets)`` batches (in a
            config, an import path such as ``torch.nn.functional.cross_entropy``); ``None`` (default) takes the
            loss from the module's ``training_step``.
        **kwargs: the arguments of :class:`~er_lightning.callbacks.base.SparsityCallback` (``sampling``, ``seed``,
            ``include``, ``exclude``, ``embeddings``, ``dense_first_layer``, ``init``, ``flow_preservation``, ...).

    Raises:
        ValueError: unknown distribution or placement, ``placement="scores"`` with a density rule or with a
            weight re-initialisation (``init`` other than ``"default"``), ``mask_file`` missing or given without
            ``from_mask``, ``num_batches``/``rounds`` < 1, a bad ``input_shape``; at ``setup``: no training data
            for SNIP/GraSP, no input shape for SynFlow, a mask file that does not match the model.

    Example:
        >>> import pytorch_lightning as pl
        >>> from er_lightning.callbacks.static import StaticSparsity
        >>> er_snip = StaticSparsity(density=0.05, distribution="snip", placement="random")
        >>> snip = StaticSparsity(density=0.05, distribution="snip", placement="scores")
        >>> trainer = pl.Trainer(max_epochs=1, callbacks=[er_snip])
        >>> # trainer.fit(SparseLightningModule("resnet18", num_classes=10), datamodule=...)
    """

    EXTRA_DISTRIBUTIONS = SOURCE_DISTRIBUTIONS

    def __init__(
        self,
        density: Density = 0.1,
        distribution: StaticDistribution = "erk",
        placement: Literal["random", "scores"] = "random",
        mask_file: str | None = None,
        num_batches: int = 1,
        input_shape: list[int] | None = None,
        rounds: int = 100,
        double: bool = False,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
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
        super().__init__(
            density=density,
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
            init=init,
            flow_preservation=flow_preservation,
            ortho_repair=ortho_repair,
            ortho_steps=ortho_steps,
            ortho_lr=ortho_lr,
            rezero_every_step=rezero_every_step,
            verify_masks=verify_masks,
            log_layer_densities=log_layer_densities,
            compute=compute,
        )
        if placement not in ("random", "scores"):
            raise ValueError(f"placement must be 'random' or 'scores', got {placement!r}")
        is_source = self.distribution in SOURCE_DISTRIBUTIONS
        if placement == "scores" and not is_source:
            raise ValueError(
                f"placement='scores' keeps the positions chosen by a criterion or a mask file, but "
                f"distribution={distribution!r} is a density rule with no positions of its own; use one of "
                f"{list(SOURCE_DISTRIBUTIONS)}, or placement='random' for a random ER mask"
            )
        if placement == "scores" and init != "default":
            raise ValueError(
                f"placement='scores' keeps the weights the criterion chose, but init={init!r} re-draws every "
                "weight after the masks are chosen; use init='default' (or placement='random')"
            )
        if self.distribution == "from_mask":
            if not mask_file or not isinstance(mask_file, (str, os.PathLike)):
                raise ValueError(
                    "distribution='from_mask' needs mask_file, the path of a saved {parameter name: bool mask} "
                    f"file (e.g. an IMP level's imp_masks/level_3.pt), got {mask_file!r}"
                )
        elif mask_file is not None:
            raise ValueError(
                f"mask_file={mask_file!r} is only read with distribution='from_mask', got "
                f"distribution={distribution!r}; drop mask_file or set distribution='from_mask'"
            )
        self.placement = placement
        self.mask_file = os.fspath(mask_file) if mask_file is not None else None
        self.num_batches = check_int(num_batches, "num_batches")
        self.rounds = check_int(rounds, "rounds")
        self.input_shape = _check_input_shape(input_shape)
        if not isinstance(double, bool):
            raise TypeError(f"double must be a bool, got {double!r}")
        self.double = double
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable (outputs, targets) -> loss or None, got {loss_fn!r}")
        self.loss_fn = loss_fn

    @override
    def mask_config(self) -> dict[str, Any]:
        config = super().mask_config()
        config.update(
            {
                "placement": self.placement,
                "mask_file": self.mask_file,
                "num_batches": self.num_batches,
                "input_shape": self.input_shape,
                "rounds": self.rounds,
                "double": self.double,
            }
        )
        return config

    # ------------------------------------------------------------------ lifecycle
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if (
            stage != "fit"
            and self.masked is None
            and self.distribution in _DATA_SOURCES
            and not self._has_training_data(trainer, pl_module)
        ):
            rank_zero_info(
                f"{type(self).__name__}: stage {stage!r} without training data: no {self.distribution} masks are "
                "drawn and the module is left as loaded (a checkpoint's weights keep their zeros)"
            )
            return
        super().setup(trainer, pl_module, stage)

    # ------------------------------------------------------------------ masks
    @override
    def compute_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, shapes: Mapping[str, Sequence[int]]
    ) -> tuple[dict[str, float], dict[str, Tensor]]:
        """Densities and masks: the ER rule, or the source's ratios with random or the source's own positions."""
        if self.distribution not in SOURCE_DISTRIBUTIONS:
            return super().compute_masks(trainer, pl_module, shapes)
        source = self.source_masks(trainer, pl_module, shapes)
        densities = {n: int(m.sum()) / max(m.numel(), 1) for n, m in source.items()}
        if self.placement == "scores":
            return densities, source
        return densities, sample_masks(shapes, densities, seed=self.seed, sampling=self.sampling)

    def source_masks(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, shapes: Mapping[str, Sequence[int]]
    ) -> dict[str, Tensor]:
        """The source mask (CPU, bool): the criterion's global prune of ``pl_module`` or the mask file.

        Raises:
            ValueError: no training data (SNIP/GraSP), no input shape (SynFlow), or a mask file whose names or
                shapes differ from the masked parameters.
        """
        if self.distribution == "from_mask":
            assert self.mask_file is not None
            masks = load_masks(self.mask_file, shapes)
            kept = sum(int(m.sum()) for m in masks.values())
            total = sum(m.numel() for m in masks.values())
            rank_zero_info(
                f"{type(self).__name__}: mask file {self.mask_file!r} keeps {kept}/{total} "
                f"(density {kept / max(total, 1):.6f})"
            )
            return {n: masks[n] for n in shapes}
        criterion = self.distribution
        batches = None
        input_shape = None
        batch_loss = None
        if criterion in _DATA_SOURCES:
            batch_loss = self._batch_loss(pl_module)
            batches = self._training_batches(trainer, pl_module)
        if criterion == "synflow":
            input_shape = self._synflow_input_shape(trainer, pl_module)
        model = _scoring_module(trainer, pl_module)
        with reporting(progress_reporter(trainer, type(self).__name__)):
            masks = prune_at_init(
                criterion,  # type: ignore[arg-type]
                model,
                list(shapes),
                self.density,
                scope="global",
                batches=batches,
                batch_loss=batch_loss,
                num_batches=self.num_batches,
                input_shape=input_shape,
                seed=self.seed,
                rounds=self.rounds,
                double=self.double,
            )
        return {n: masks[n].detach().to("cpu", torch.bool) for n in shapes}

    def _batch_loss(self, pl_module: pl.LightningModule) -> BatchLoss | None:
        """``None`` when ``loss_fn`` is given (scores.py applies it), else the module's ``training_step``."""
        if self.loss_fn is not None:
            return None
        name = type(pl_module).__name__
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{self.distribution} takes its loss from {name}.training_step by default, but {name} uses manual "
                "optimization (automatic_optimization=False): its training_step steps the optimizers itself. "
                "Pass loss_fn=(outputs, targets) -> loss (applied to module(inputs) on (inputs, targets) batches)"
            )
        if not is_overridden("training_step", pl_module):
            raise ValueError(
                f"{self.distribution} takes its loss from {name}.training_step by default, but {name} defines none; "
                "pass loss_fn=(outputs, targets) -> loss"
            )
        return training_step_loss

    # ------------------------------------------------------------------ data
    @staticmethod
    def _training_loader(trainer: pl.Trainer, pl_module: pl.LightningModule) -> Iterable[Any] | None:
        """The training loader of this fit, or ``None`` when there is none."""
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            return datamodule.train_dataloader()
        # What trainer.fit(model, train_dataloaders=...) received, or the module itself when its train_dataloader
        # is the source; the same (private) accessor Lightning's BatchSizeFinder uses.
        source = getattr(getattr(trainer, "fit_loop", None), "_data_source", None)
        if source is not None and source.instance is not None and source.is_defined():
            return source.dataloader()
        if is_overridden("train_dataloader", pl_module):
            return pl_module.train_dataloader()
        return None

    def _has_training_data(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        try:
            return self._training_loader(trainer, pl_module) is not None
        except Exception:  # noqa: BLE001 - a datamodule set up for "test" may refuse to build its training split
            return False

    def _training_batches(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[Any]:
        """The first ``num_batches`` training batches, fetched without touching the global RNG."""
        loader = self._training_loader(trainer, pl_module)
        if loader is None:
            raise ValueError(
                f"{self.distribution} needs training batches: attach a datamodule or define train_dataloader "
                "(or pass train_dataloaders to trainer.fit); data-free alternatives are 'synflow' and 'magnitude'"
            )
        with torch.random.fork_rng(devices=[]):
            iterator = iter(loader)
            batches = list(itertools.islice(iterator, self.num_batches))
            del iterator
        if len(batches) < self.num_batches:
            raise ValueError(
                f"num_batches={self.num_batches}, but the training data yields only {len(batches)} batches; "
                "lower num_batches"
            )
        return batches

    def _synflow_input_shape(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> list[int]:
        if self.input_shape is not None:
            return self.input_shape
        for owner in (pl_module, getattr(pl_module, "model", None)):
            shape = getattr(owner, "input_shape", None)
            if shape is not None:
                return list(shape)
        try:
            loader = self._training_loader(trainer, pl_module)
        except Exception:  # noqa: BLE001 - fall through to the explanation below
            loader = None
        if loader is not None:
            with torch.random.fork_rng(devices=[]):
                first = next(iter(loader), None)
            x = first[0] if isinstance(first, (list, tuple)) and first else first
            if isinstance(x, Tensor) and x.dim() >= 2:
                return list(x.shape[1:])
        raise ValueError(
            "synflow needs the shape of one input sample: pass input_shape (e.g. [3, 32, 32]), give the module "
            "(or its `model` backbone) an `input_shape` attribute, or provide training data to read it from"
        )


def training_step_loss(module: pl.LightningModule, batch: Any) -> Tensor:
    """The loss ``module.training_step(batch, 0)`` returns, on a module without a trainer (a scoring copy).

    The batch goes through the module's own ``on_before_batch_transfer``, ``transfer_batch_to_device`` (to the
    module's device) and ``on_after_batch_transfer`` first, as in training. ``self.log`` warnings of the copy (it
    has no trainer) are silenced. The step may return the loss or a mapping with a ``"loss"`` entry.

    Raises:
        RuntimeError: ``training_step`` raised (e.g. it reads ``self.trainer``); the message says how to pass a
            ``loss_fn`` instead.
        ValueError: it returned no scalar loss.
    """
    name = type(module).__name__
    device = next(module.parameters()).device
    batch = module.on_before_batch_transfer(batch, 0)
    batch = module.transfer_batch_to_device(batch, device, 0)
    batch = module.on_after_batch_transfer(batch, 0)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*self\.log\(\)")
        try:
            out = module.training_step(batch, 0)
        except Exception as err:
            raise RuntimeError(
                f"the pruning-at-init loss is taken from {name}.training_step, which raised {type(err).__name__}: "
                f"{err} on the scoring copy (an eval-mode copy without a trainer); make training_step work "
                "without self.trainer, or pass loss_fn=(outputs, targets) -> loss to the callback"
            ) from err
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError(
            f"{name}.training_step must return the loss (a scalar tensor) or {{'loss': loss}} to be used for "
            f"pruning-at-init scores, got {type(out).__name__}; or pass loss_fn=(outputs, targets) -> loss"
        )
    return loss


def _scoring_module(trainer: pl.Trainer, pl_module: pl.LightningModule) -> torch.nn.Module:
    """``pl_module``, or a copy on the strategy's device when the module still sits elsewhere (CPU at setup)."""
    device = trainer.strategy.root_device
    param = next(pl_module.parameters(), None)
    if param is None or param.device == device or device.type == "cpu":
        return pl_module
    return copy.deepcopy(pl_module).to(device)  # LightningModule.__getstate__ drops the trainer reference


def _check_input_shape(shape: Sequence[int] | None) -> list[int] | None:
    if shape is None:
        return None
    dims = list(shape) if isinstance(shape, Sequence) and not isinstance(shape, str) else None
    if not dims or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in dims):
        raise ValueError(
            f"input_shape must be a non-empty list of positive ints (one sample, no batch dimension, e.g. "
            f"[3, 32, 32]), got {shape!r}"
        )
    return dims
