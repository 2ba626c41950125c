"""Pruning-at-initialisation scores (SNIP, GraSP, SynFlow, magnitude, random) and the masks they give.

Every scorer takes a model and a list of parameter FQNs (as ``model.named_parameters()`` yields them) and returns
``{fqn: score}``, each score shaped like its parameter and on the parameter's device. **A larger score always
means "keep"**: masks keep the top scores (:func:`score_masks`, :func:`prune_at_init`).

Criteria (:data:`SCORE_CRITERIA`):

* ``"magnitude"``: ``|W|``.
* ``"random"``: uniform ``[0, 1)`` from a dedicated CPU generator seeded from ``(seed, fqn)``.
* ``"snip"`` (Lee et al. 2019, arXiv:1810.02340): ``|g ⊙ W|``, ``g`` the gradient of the loss.
* ``"grasp"`` (Wang et al. 2020, arXiv:2002.07376): ``W ⊙ Hg``, the *negation* of the paper's ``-W ⊙ Hg`` (GraSP
  removes the largest ``-W ⊙ Hg``, so keeping the largest ``W ⊙ Hg`` is the same rule).
* ``"synflow"`` (Tanaka et al. 2020, arXiv:2006.05467): data-free ``|∂R/∂W ⊙ W|`` on the network with every
  state-dict entry replaced by its absolute value, fed an all-ones input (token models: every embedding returns
  the sum of its rows); iterated over ``rounds`` by :func:`synflow_masks`.

**Which loss.** SNIP and GraSP compute ``loss_fn(model(x), y)`` on ``(x, y)`` batches (cross-entropy by default),
or, given ``batch_loss``, any loss of a batch of any structure (a LightningModule's ``training_step``: see
:class:`~er_lightning.callbacks.static.StaticSparsity`). GraSP runs under the math attention kernel, whose double
backward exists (the fused SDPA kernels have none).

**Fixed mode and model state.** Gradient-based scores (snip, grasp, synflow) are computed on a ``copy.deepcopy`` of
the model put in **eval mode**: BatchNorm uses (and never updates) its running statistics and dropout is off, so the
scores are deterministic given the model and the batches. Only the scored parameters require grad on the copy.
The model passed in is left exactly as it was: parameters and buffers bit-identical, ``.training`` flags,
``requires_grad`` flags and ``.grad`` (``None`` stays ``None``) untouched. The global RNG (CPU and the accelerator
devices holding the model) is forked around every scorer, so scoring neither reads nor advances it; randomness
inside the ``batches`` iterable (for instance a shuffling ``DataLoader``) is the caller's affair.

**Existing masks.** Every scorer accepts ``masks`` (``{fqn: mask}``, nonzero = kept, for any parameter of the
model, scored or not): the scores are computed on the masked network ``W ⊙ M`` and masked-out entries score
exactly 0 for every criterion. Since 0 is not the lowest possible GraSP score, pass the same ``masks`` to
:func:`score_masks` (or :func:`prune_at_init`, which does it for you) so that pruned entries stay pruned.

Example:
    >>> import torch.nn as nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> masks = prune_at_init("synflow", net, ["0.weight", "2.weight"], 0.5, input_shape=(4,), rounds=10)
    >>> sum(int(m.sum()) for m in masks.values())
    28
"""

from __future__ import annotations

import copy
import itertools
import math
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from er_lightning.sparsity.checks import check_density, check_int
from er_lightning.sparsity.progress import report
from er_lightning.sparsity.topk import exact_count, global_topk_masks, topk_mask

__all__ = [
    "SCORE_CRITERIA",
    "BatchLoss",
    "Criterion",
    "Scope",
    "compute_scores",
    "grasp_scores",
    "magnitude_scores",
    "prune_at_init",
    "random_scores",
    "score_masks",
    "snip_scores",
    "synflow_masks",
    "synflow_scores",
]

Criterion = Literal["snip", "grasp", "synflow", "magnitude", "random"]
Scope = Literal["global", "layerwise"]
LossFn = Callable[[Tensor, Tensor], Tensor]
Batch = tuple[Tensor, Tensor]
#: ``batch_loss(model, batch) -> scalar loss``: how a batch of any structure (token dicts, several inputs) becomes
#: a loss on ``model`` (the scoring copy). It receives the batch as the iterable yields it and moves it to the
#: model's device itself. Replaces ``loss_fn(model(x), y)`` when given.
BatchLoss = Callable[[nn.Module, Any], Tensor]

#: Names accepted by :func:`compute_scores` and :func:`prune_at_init`.
SCORE_CRITERIA: tuple[str, ...] = get_args(Criterion)
_SCOPES: tuple[str, ...] = get_args(Scope)
_DATA_CRITERIA = ("snip", "grasp")


# --------------------------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------------------------


def _check_model(model: object) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_names(model: nn.Module, names: Sequence[str]) -> dict[str, nn.Parameter]:
    """Return ``{fqn: parameter}`` for ``names``; raise if a name is unknown, repeated, or the list is empty."""
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise TypeError(f"names must be a list of parameter FQNs, got {names!r}")
    names = list(names)
    if not names:
        raise ValueError(
            "names is empty: give the FQNs of the parameters to score (from model.named_parameters())"
        )
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"names lists these parameters more than once: {duplicated}")
    available = dict(model.named_parameters())
    missing = [n for n in names if n not in available]
    if missing:
        raise ValueError(
            f"these names are not parameters of the model: {missing}; "
            f"the model's parameters are {list(available)}"
        )
    return {n: available[n] for n in names}


def _check_masks(model: nn.Module, masks: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
    """Return the masks as bool tensors; raise if a key is not a parameter or a shape differs."""
    if masks is None:
        return {}
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a mapping {{fqn: mask}} or None, got {type(masks).__name__}")
    available = dict(model.named_parameters())
    unknown = [n for n in masks if n not in available]
    if unknown:
        raise ValueError(f"masks has entries for names that are not parameters of the model: {unknown}")
    out: dict[str, Tensor] = {}
    for n, m in masks.items():
        if not isinstance(m, Tensor):
            raise TypeError(f"masks[{n!r}] must be a Tensor, got {type(m).__name__}")
        if tuple(m.shape) != tuple(available[n].shape):
            raise ValueError(
                f"masks[{n!r}] has shape {tuple(m.shape)}, but the parameter has shape {tuple(available[n].shape)}"
            )
        out[n] = m.detach().to(dtype=torch.bool)
    return out


def _check_scope(scope: str) -> None:
    if scope not in _SCOPES:
        raise ValueError(f"scope must be one of {_SCOPES}, got {scope!r}")


def _check_input_shape(input_shape: Sequence[int] | None) -> tuple[int, ...]:
    if input_shape is None:
        raise ValueError(
            "synflow needs input_shape, the shape of one input sample without the batch dimension "
            "(for example input_shape=(3, 32, 32) for CIFAR images)"
        )
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    shape = tuple(input_shape)
    if not shape or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(f"input_shape must be a non-empty sequence of positive ints, got {input_shape!r}")
    return shape


# --------------------------------------------------------------------------------------------------------------
# Shared machinery
# --------------------------------------------------------------------------------------------------------------


@contextmanager
def _isolated_rng(model: nn.Module) -> Iterator[None]:
    """Fork the global RNG of the CPU and of the accelerator devices that hold ``model``; restore it on exit."""
    accel = sorted(
        {(t.device.type, t.device.index or 0) for t in model.parameters() if t.device.type != "cpu"}
    )
    if accel:
        device_type = accel[0][0]
        devices = [i for kind, i in accel if kind == device_type]
        with torch.random.fork_rng(devices=devices, device_type=device_type):
            yield
    else:
        with torch.random.fork_rng(devices=[]):
            yield


def _scoring_copy(model: nn.Module, names: Sequence[str]) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """Deep copy of ``model`` in eval mode where only ``names`` require grad and no ``.grad`` is set."""
    clone = copy.deepcopy(model)
    clone.eval()
    for p in clone.parameters():
        p.requires_grad_(False)
        p.grad = None
    params = dict(clone.named_parameters())
    for n in names:
        params[n].requires_grad_(True)
    return clone, params


@torch.no_grad()
def _apply_masks_(params: Mapping[str, nn.Parameter], masks: Mapping[str, Tensor]) -> None:
    for n, m in masks.items():
        params[n].mul_(m.to(device=params[n].device, dtype=params[n].dtype))


def _finish(
    scores: dict[str, Tensor], params: Mapping[str, Tensor], keep_dtype: bool = False
) -> dict[str, Tensor]:
    """Detach, cast to float32 (unless ``keep_dtype``) and place each score on its original parameter's device."""
    out: dict[str, Tensor] = {}
    for n, s in scores.items():
        dtype = s.dtype if keep_dtype else torch.float32
        out[n] = s.detach().to(device=params[n].device, dtype=dtype)
    return out


def _mask_scores_(scores: dict[str, Tensor], masks: Mapping[str, Tensor]) -> None:
    """Set masked-out entries to exactly 0 (also turns ``-0.0`` or NaN*0 artefacts into a clean 0)."""
    for n, s in scores.items():
        if n in masks:
            m = masks[n].to(s.device)
            scores[n] = torch.where(m, s, torch.zeros_like(s))


def _collect_batches(
    batches: Iterable[Any] | None, num_batches: int, criterion: str, any_structure: bool = False
) -> list[Any]:
    """The first ``num_batches`` batches; ``(inputs, targets)`` pairs of tensors unless ``any_structure``."""
    num_batches = check_int(num_batches, "num_batches")
    if batches is None:
        raise ValueError(
            f"{criterion} is data-driven and needs training batches: pass batches=(an iterable of "
            "(inputs, targets), e.g. a train dataloader), or, from a callback, give the Trainer a datamodule or "
            "train dataloader"
        )
    if isinstance(batches, Tensor) or not isinstance(batches, Iterable):
        raise TypeError(
            f"batches must be an iterable of (inputs, targets) pairs, got {type(batches).__name__}"
        )
    out: list[Any] = []
    for i, batch in enumerate(itertools.islice(iter(batches), num_batches)):
        if any_structure:
            out.append(batch)
            continue
        if isinstance(batch, Tensor) or not isinstance(batch, Sequence) or len(batch) < 2:
            raise TypeError(
                f"batch {i} must be an (inputs, targets) pair, got {type(batch).__name__}; "
                "to score on a single batch pass batches=[(inputs, targets)]"
            )
        x, y = batch[0], batch[1]
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(
                f"batch {i} must hold tensors (inputs, targets), got ({type(x).__name__}, {type(y).__name__})"
            )
        out.append((x, y))
    if len(out) < num_batches:
        raise ValueError(f"num_batches={num_batches}, but batches yielded only {len(out)}; lower num_batches")
    return out


def _loss(
    model: nn.Module,
    batch: Any,
    loss_fn: LossFn,
    device: torch.device,
    temperature: float = 1.0,
    batch_loss: BatchLoss | None = None,
) -> Tensor:
    if batch_loss is not None:
        return _batch_loss(model, batch, batch_loss, temperature)
    x, y = batch
    out = model(x.to(device))
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return a Tensor to be scored, got {type(out).__name__}")
    if temperature != 1.0:
        out = out / temperature
    loss = loss_fn(out, y.to(device))
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise ValueError("loss_fn must return a scalar tensor (a mean loss over the batch)")
    return loss.reshape(())


def _batch_loss(model: nn.Module, batch: Any, batch_loss: BatchLoss, temperature: float) -> Tensor:
    """``batch_loss(model, batch)``; a temperature divides what ``model``'s own forward returns (a hook)."""
    calls = []

    def divide(module: nn.Module, args: Any, out: Any) -> Tensor:
        if not isinstance(out, Tensor):
            raise TypeError(
                f"a temperature divides the logits the model's forward returns, got {type(out).__name__}; "
                "pass temperature=1.0 or a batch_loss that scales the logits itself"
            )
        calls.append(1)
        return out / temperature

    handle = model.register_forward_hook(divide) if temperature != 1.0 else None
    try:
        loss = batch_loss(model, batch)
    finally:
        if handle is not None:
            handle.remove()
    if handle is not None and not calls:
        raise ValueError(
            f"temperature={temperature} divides the logits returned by the model's forward, but the loss never "
            f"called {type(model).__name__}.forward (it called a submodule directly?); pass temperature=1.0, or a "
            "loss_fn so that the scorer calls the model itself"
        )
    if not isinstance(loss, Tensor) or loss.numel() != 1 or not torch.is_floating_point(loss):
        raise ValueError(
            f"the batch loss must be a scalar floating-point tensor (a mean over the batch), got "
            f"{type(loss).__name__}{'' if not isinstance(loss, Tensor) else f' of shape {tuple(loss.shape)}'}"
        )
    return loss.reshape(())


def _grads(loss: Tensor, tensors: Sequence[Tensor], create_graph: bool = False) -> list[Tensor]:
    """Gradients of ``loss`` w.r.t. ``tensors``; a tensor unused by ``loss`` gets zeros."""
    grads = torch.autograd.grad(loss, list(tensors), create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, tensors)]


@contextmanager
def _grad_enabled() -> Iterator[None]:
    """Autograd on, even when the caller runs under ``torch.no_grad()`` or ``torch.inference_mode()``."""
    with torch.inference_mode(False), torch.enable_grad():
        yield


# --------------------------------------------------------------------------------------------------------------
# Scorers
# --------------------------------------------------------------------------------------------------------------


def magnitude_scores(
    model: nn.Module, names: Sequence[str], *, masks: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Score each weight by its magnitude ``|W ⊙ M|``.

    Args:
        model: the network; not modified.
        names: FQNs of the parameters to score.
        masks: optional current masks (nonzero = kept); masked-out entries score 0.

    Returns:
        ``{fqn: float32 tensor}`` shaped and placed like each parameter.

    Raises:
        ValueError: a name is not a parameter of ``model``, or a mask does not fit.
    """
    _check_model(model)
    params = _check_names(model, names)
    mask_map = _check_masks(model, masks)
    scores = {n: p.detach().abs().float() for n, p in params.items()}
    _mask_scores_(scores, mask_map)
    return _finish(scores, params)


def _layer_seed(seed: int, name: str) -> int:
    # Seed from (seed, FQN) so that a layer's scores do not depend on which other layers are scored. crc32 is
    # stable across processes, unlike hash().
    return (seed * 1_000_003 + zlib.crc32(name.encode("utf-8"))) % (2**63)


def random_scores(
    model: nn.Module, names: Sequence[str], *, seed: int, masks: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Score each weight uniformly at random in ``[0, 1)`` (random pruning).

    Each parameter draws from its own CPU ``torch.Generator`` seeded from ``(seed, fqn)`` (via ``zlib.crc32``), so
    the scores depend only on ``seed``, the FQN and the shape: not on the global RNG, the device, or which other
    parameters are scored.

    Args:
        model: the network; not modified.
        names: FQNs of the parameters to score.
        seed: any int.
        masks: optional current masks; masked-out entries score 0.

    Returns:
        ``{fqn: float32 tensor}`` shaped and placed like each parameter.
    """
    _check_model(model)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    params = _check_names(model, names)
    mask_map = _check_masks(model, masks)
    scores: dict[str, Tensor] = {}
    for n, p in params.items():
        gen = torch.Generator(device="cpu").manual_seed(_layer_seed(seed, n))
        scores[n] = torch.rand(p.shape, generator=gen, dtype=torch.float32)
    _mask_scores_(scores, {n: m.cpu() for n, m in mask_map.items()})
    return _finish(scores, params)


def snip_scores(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Any] | None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    batch_loss: BatchLoss | None = None,
    num_batches: int = 1,
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """SNIP connection sensitivity ``|g ⊙ W|`` (Lee et al. 2019, arXiv:1810.02340).

    ``g`` is the gradient, at ``W ⊙ M``, of the loss **averaged** over the first ``num_batches`` batches, each
    batch contributing its mean loss ``loss_fn(model(x), y)`` (so the scale does not grow with ``num_batches``).
    Computed on an eval-mode copy of the model (see the module docstring).

    Args:
        model: the network; left exactly as it was.
        names: FQNs of the parameters to score.
        batches: iterable of ``(inputs, targets)``, e.g. a train dataloader; only the first ``num_batches`` are read.
            With ``batch_loss``, batches of any structure.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``; cross-entropy by default.
        batch_loss: ``batch_loss(model, batch) -> scalar`` (:data:`BatchLoss`), used instead of ``loss_fn`` when
            given, e.g. a LightningModule's own ``training_step``.
        num_batches: how many batches to average over, >= 1.
        masks: optional current masks, applied to the weights before scoring; masked-out entries score 0.

    Returns:
        ``{fqn: float32 tensor}`` shaped and placed like each parameter.

    Raises:
        ValueError: no batches, too few batches, ``num_batches < 1``, unknown names, or a mask that does not fit.
    """
    _check_model(model)
    params = _check_names(model, names)
    mask_map = _check_masks(model, masks)
    data = _collect_batches(batches, num_batches, "snip", any_structure=batch_loss is not None)
    names = list(params)
    with _isolated_rng(model), _grad_enabled():
        clone, cparams = _scoring_copy(model, names)
        _apply_masks_(cparams, mask_map)
        tensors = [cparams[n] for n in names]
        device = tensors[0].device
        total = [torch.zeros_like(t) for t in tensors]
        for i, batch in enumerate(data, 1):
            grads = _grads(_loss(clone, batch, loss_fn, device, batch_loss=batch_loss), tensors)
            for acc, g in zip(total, grads):
                acc.add_(g)
            report("snip batches", i, len(data))
        scores = {n: (acc / len(data) * t.detach()).abs() for n, acc, t in zip(names, total, tensors)}
    _mask_scores_(scores, mask_map)
    return _finish(scores, params)


def grasp_scores(
    model: nn.Module,
    names: Sequence[str],
    batches: Iterable[Any] | None,
    *,
    loss_fn: LossFn = F.cross_entropy,
    batch_loss: BatchLoss | None = None,
    num_batches: int = 1,
    temperature: float = 200.0,
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """GraSP gradient-signal-preservation score ``W ⊙ (H g)`` (Wang et al. 2020, arXiv:2002.07376).

    With ``L`` the loss averaged over the first ``num_batches`` batches (each batch's mean ``loss_fn`` of the
    logits divided by ``temperature``), ``g = ∇L`` and ``H = ∇²L``, both with respect to the scored parameters
    only (``H`` is the Hessian block of ``names``), evaluated at ``W ⊙ M``. ``Hg`` is computed by double backward:
    ``Hg = ∇(stop_grad(g) · ∇L)``.

    Sign convention: the paper scores ``S(-W) = -W ⊙ Hg`` and removes the weights with the **largest** ``S``; this
    function returns ``-S = W ⊙ Hg`` so that, as for every scorer here, **larger means keep**. Scores can be
    negative; masked-out entries score exactly 0, so use the same ``masks`` in :func:`score_masks`.

    Args:
        model: the network; left exactly as it was. Must be twice differentiable (standard layers are).
        names: FQNs of the parameters to score.
        batches: iterable of ``(inputs, targets)``; only the first ``num_batches`` are read (each is used twice).
        loss_fn: ``loss_fn(outputs / temperature, targets) -> scalar``; cross-entropy by default.
        batch_loss: ``batch_loss(model, batch) -> scalar``, used instead of ``loss_fn`` when given; the temperature
            then divides whatever the model's ``forward`` returns (a forward hook), and it is an error if the loss
            never calls that ``forward``.
        num_batches: how many batches to average over, >= 1.
        temperature: the logits are divided by it before ``loss_fn``, as in GraSP (200 there); 1 disables it.
        masks: optional current masks, applied to the weights before scoring.

    Returns:
        ``{fqn: float32 tensor}`` shaped and placed like each parameter.

    Raises:
        ValueError: no batches, too few batches, ``num_batches < 1``, ``temperature <= 0``, unknown names, or a
            mask that does not fit.
    """
    _check_model(model)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a positive float, got {temperature!r}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite float (GraSP uses 200), got {temperature}")
    params = _check_names(model, names)
    mask_map = _check_masks(model, masks)
    data = _collect_batches(batches, num_batches, "grasp", any_structure=batch_loss is not None)
    names = list(params)
    temperature = float(temperature)
    # Fused attention kernels (flash / memory-efficient SDPA) have no double backward; the math kernel has.
    with _isolated_rng(model), _grad_enabled(), sdpa_kernel(SDPBackend.MATH):
        clone, cparams = _scoring_copy(model, names)
        _apply_masks_(cparams, mask_map)
        tensors = [cparams[n] for n in names]
        device = tensors[0].device
        # Pass 1: g = gradient of the batch-averaged loss (a constant in pass 2).
        g = [torch.zeros_like(t) for t in tensors]
        for i, batch in enumerate(data, 1):
            loss = _loss(clone, batch, loss_fn, device, temperature, batch_loss)
            for acc, gb in zip(g, _grads(loss, tensors)):
                acc.add_(gb, alpha=1.0 / len(data))
            report("grasp batches (2 passes)", i, 2 * len(data))
        # Pass 2: Hg = d/dW (g · ∇L), summed over batches of the averaged loss.
        hg = [torch.zeros_like(t) for t in tensors]
        for i, batch in enumerate(data, 1):
            loss = _loss(clone, batch, loss_fn, device, temperature, batch_loss) / len(data)
            grad_f = _grads(loss, tensors, create_graph=True)
            z = sum((gi * fi).sum() for gi, fi in zip(g, grad_f) if fi.requires_grad)
            if isinstance(z, Tensor) and z.requires_grad:
                for acc, hb in zip(hg, _grads(z, tensors)):
                    acc.add_(hb)
            report("grasp batches (2 passes)", len(data) + i, 2 * len(data))
        scores = {n: t.detach() * h for n, t, h in zip(names, tensors, hg)}
    _mask_scores_(scores, mask_map)
    return _finish(scores, params)


@torch.no_grad()
def _linearize_(model: nn.Module) -> None:
    """Replace every floating-point state-dict entry (parameters *and* buffers, BN running stats included) by |·|."""
    for t in model.state_dict(keep_vars=True).values():
        if torch.is_floating_point(t):
            t.abs_()


def _sum_of_rows(module: nn.Module, args: Any, out: Tensor) -> Tensor:
    """Forward hook: an ``nn.Embedding`` looks up the all-ones one-hot vector, i.e. returns the sum of its rows."""
    weight = module.weight
    rows = weight.sum(0)
    if module.padding_idx is not None:  # the padding row is never trained: it takes no part
        rows = rows - weight[module.padding_idx]
    return rows.expand_as(out)


def _all_ones_embeddings_(clone: nn.Module) -> bool:
    """Hook every ``nn.Embedding`` of ``clone`` with :func:`_sum_of_rows`; return whether there was one.

    SynFlow feeds the linearised network an all-ones input. A lookup ``E[i]`` is the matmul ``onehot(i) @ E``, so
    its all-ones input is ``1 @ E``, the sum of the rows, the same vector at every position; every row then gets
    the same signal, as every input unit of a linear layer does.

    Raises:
        ValueError: an ``nn.EmbeddingBag`` (bags have no all-ones analogue of fixed size here).
    """
    found = False
    for name, module in clone.named_modules():
        if isinstance(module, nn.EmbeddingBag):
            raise ValueError(
                f"synflow cannot score a model with an nn.EmbeddingBag ({name!r}): its all-ones input has no fixed "
                "shape; use a data-driven criterion ('snip', 'grasp') or 'magnitude'"
            )
        if isinstance(module, nn.Embedding):
            module.register_forward_hook(_sum_of_rows)
            found = True
    return found


def _synflow_pass(
    clone: nn.Module,
    tensors: Sequence[Tensor],
    input_shape: tuple[int, ...],
    dtype: torch.dtype,
    tokens: bool = False,
) -> list[Tensor]:
    """One SynFlow pass on an already linearised copy: ``|∂R/∂W ⊙ W|`` with ``R = sum(f(1))``.

    ``tokens``: the model embeds token ids; it gets int64 zeros of ``(1, *input_shape)`` and its embeddings return
    the sum of their rows (:func:`_all_ones_embeddings_`). Otherwise the input is ``ones((1, *input_shape))``.
    """
    device = tensors[0].device
    if tokens:
        inputs = torch.zeros((1, *input_shape), dtype=torch.long, device=device)
        kind = "int64 token ids (every nn.Embedding returning the sum of its rows: an all-ones one-hot input)"
    else:
        inputs = torch.ones((1, *input_shape), dtype=dtype, device=device)
        kind = f"an all-ones {dtype} tensor"
    try:
        out = clone(inputs)
    except (RuntimeError, TypeError, ValueError, IndexError) as err:
        raise ValueError(
            f"synflow fed {kind} of shape {tuple(inputs.shape)} to the model, which raised "
            f"{type(err).__name__}: {err}. SynFlow needs a model that maps this input to a Tensor: check "
            "input_shape (one sample without the batch dimension; (seq_len,) for a token model), or use a "
            "data-driven criterion ('snip') or 'magnitude'"
        ) from err
    if not isinstance(out, Tensor):
        raise TypeError(f"the model must return a Tensor to be scored, got {type(out).__name__}")
    r = out.sum()
    if not torch.isfinite(r):
        raise ValueError(
            f"the SynFlow objective R = sum(f(1)) is {r.item()} in {dtype}; pass double=True to compute in float64 "
            "(a float buffer holding -inf, such as an additive attention mask, becomes +inf under |·|: use a "
            "bool mask)"
        )
    grads = _grads(r, tensors)
    return [(g * t.detach()).abs() for g, t in zip(grads, tensors)]


def _synflow_setup(
    model: nn.Module, names: Sequence[str], mask_map: Mapping[str, Tensor], double: bool
) -> tuple[nn.Module, list[Tensor], torch.dtype, bool]:
    clone, cparams = _scoring_copy(model, names)
    if double:
        clone.double()
    _linearize_(clone)
    _apply_masks_(cparams, mask_map)
    tensors = [cparams[n] for n in names]
    dtype = torch.float64 if double else tensors[0].dtype
    if not torch.is_floating_point(tensors[0]):
        raise TypeError(f"synflow needs floating-point parameters, got {tensors[0].dtype} for {names[0]!r}")
    tokens = _all_ones_embeddings_(clone)
    return clone, tensors, dtype, tokens


def synflow_scores(
    model: nn.Module,
    names: Sequence[str],
    *,
    input_shape: Sequence[int] | None,
    masks: Mapping[str, Tensor] | None = None,
    double: bool = False,
) -> dict[str, Tensor]:
    """Single-shot SynFlow scores ``|∂R/∂W ⊙ W|`` (Tanaka et al. 2020, arXiv:2006.05467), data-free.

    On an eval-mode copy, every floating-point entry of the state dict is replaced by its absolute value: weights,
    biases, BN affine parameters **and BN running statistics** (as Synaptic-Flow and upstream STR do, Q27; the
    running variance is positive anyway, the running mean becomes ``|mean|``). BN normalises with these running
    statistics. The masks are applied, an all-ones input of shape ``(1, *input_shape)`` is fed forward, and
    ``R = sum(output)`` is backpropagated. **Token models**: when the model has an ``nn.Embedding``, the input is
    int64 token ids of shape ``(1, *input_shape)`` (``input_shape = (seq_len,)``) and every embedding returns the sum
    of its rows at every position: a lookup is ``onehot(i) @ E``, so its all-ones input is ``1 @ E`` (the padding row
    excluded). An ``nn.EmbeddingBag`` raises (no fixed-size all-ones bag). For a bias-free ReLU network the per-layer score sums all equal ``R``
    (the conservation law of the paper). The model passed in is untouched (the copy is discarded), so its signs
    and values are exactly as before.

    Args:
        model: the network; left exactly as it was. Must return a Tensor.
        names: FQNs of the parameters to score.
        input_shape: shape of one input sample, without the batch dimension, e.g. ``(3, 32, 32)``.
        masks: optional current masks, applied to ``|W|`` before the pass; masked-out entries score 0.
        double: compute in float64 (deep networks can overflow float32).

    Returns:
        ``{fqn: tensor}`` shaped and placed like each parameter: float32, or float64 when ``double`` so that the
        extended range survives.

    Raises:
        ValueError: ``input_shape`` missing, unknown names, a mask that does not fit, ``R`` not finite, the model
            failing on the all-ones input (the message says what was fed), or an ``nn.EmbeddingBag``.
    """
    _check_model(model)
    shape = _check_input_shape(input_shape)
    params = _check_names(model, names)
    mask_map = _check_masks(model, masks)
    names = list(params)
    with _isolated_rng(model), _grad_enabled():
        clone, tensors, dtype, tokens = _synflow_setup(model, names, mask_map, bool(double))
        scores = dict(zip(names, _synflow_pass(clone, tensors, shape, dtype, tokens)))
    _mask_scores_(scores, mask_map)
    return _finish(scores, params, keep_dtype=bool(double))


# --------------------------------------------------------------------------------------------------------------
# Scores to masks
# --------------------------------------------------------------------------------------------------------------


def _targets(
    numels: Mapping[str, int], available: Mapping[str, int], density: float, scope: str, clip: bool
) -> dict[str, int] | int:
    """Entries to keep: one total (global) or one count per tensor (layerwise), at most ``available``.

    With ``clip`` a target above the number of candidates is lowered to it; otherwise that raises.
    """
    if scope == "global":
        total = sum(numels.values())
        k = exact_count(density, total)
        have = sum(available.values())
        if k > have and not clip:
            raise ValueError(
                f"density {density} keeps {k} of {total} entries, but the current masks keep only {have}: "
                "pruning cannot regrow; lower density or drop masks"
            )
        return min(k, have)
    out: dict[str, int] = {}
    for n, numel in numels.items():
        k = exact_count(density, numel)
        if k > available[n] and not clip:
            raise ValueError(
                f"density {density} keeps {k} of {numel} entries of {n!r}, but its current mask keeps only "
                f"{available[n]}: pruning cannot regrow; lower density or drop masks"
            )
        out[n] = min(k, available[n])
    return out


def _counts(
    shapes: Mapping[str, torch.Size], candidates: Mapping[str, Tensor] | None
) -> tuple[dict[str, int], dict[str, int]]:
    numels = {n: math.prod(s) for n, s in shapes.items()}
    if candidates is None:
        return numels, dict(numels)
    return numels, {n: int(candidates[n].sum()) if n in candidates else numels[n] for n in shapes}


def _select(
    scores: Mapping[str, Tensor],
    density: float,
    scope: str,
    candidates: Mapping[str, Tensor] | None,
    clip: bool,
) -> dict[str, Tensor]:
    """Keep ``round(density * N)`` (global) or ``round(density * n_l)`` per layer, among ``candidates``."""
    numels, available = _counts({n: s.shape for n, s in scores.items()}, candidates)
    k = _targets(numels, available, density, scope, clip)
    if isinstance(k, int):
        return global_topk_masks(scores, k, candidates)
    out: dict[str, Tensor] = {}
    for n, s in scores.items():
        cand = None if candidates is None or n not in candidates else candidates[n].to(s.device)
        out[n] = topk_mask(s, k[n], cand)
    return out


def _check_scores(scores: Mapping[str, Tensor]) -> None:
    if not isinstance(scores, Mapping) or not scores:
        raise ValueError("scores must be a non-empty mapping {fqn: tensor}")
    for n, s in scores.items():
        if not isinstance(s, Tensor):
            raise TypeError(f"scores[{n!r}] must be a Tensor, got {type(s).__name__}")


def score_masks(
    scores: Mapping[str, Tensor],
    density: float,
    *,
    scope: Scope = "global",
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Keep the highest scores with an exact count.

    ``"global"`` keeps exactly ``round(density * N)`` entries over all tensors together (``N`` the total number of
    entries); ``"layerwise"`` keeps exactly ``round(density * n_l)`` in each tensor. Ties are broken by position
    (mapping order, then flat index), so equal scores give the same masks on every device.

    Args:
        scores: ``{fqn: scores}``, larger = keep.
        density: fraction kept, in (0, 1], of all entries (global) or of each tensor (layerwise).
        scope: ``"global"`` or ``"layerwise"``.
        masks: optional current masks; only entries they keep may be kept (pruning never regrows).

    Returns:
        ``{fqn: bool tensor}`` shaped and placed like the scores.

    Raises:
        ValueError: ``density`` outside (0, 1], unknown ``scope``, or more entries asked than ``masks`` keep.
    """
    density = check_density(density)
    _check_scope(scope)
    _check_scores(scores)
    candidates = None
    if masks is not None:
        unknown = [n for n in masks if n not in scores]
        if unknown:
            raise ValueError(f"masks has entries without scores: {unknown}; scored are {list(scores)}")
        candidates = {n: m.detach().to(torch.bool) for n, m in masks.items()}
        for n, m in candidates.items():
            if m.shape != scores[n].shape:
                raise ValueError(f"masks[{n!r}] has shape {tuple(m.shape)}, scores {tuple(scores[n].shape)}")
    return _select(scores, density, scope, candidates, clip=False)


def synflow_masks(
    model: nn.Module,
    names: Sequence[str],
    density: float,
    *,
    input_shape: Sequence[int] | None,
    rounds: int = 100,
    double: bool = False,
    masks: Mapping[str, Tensor] | None = None,
    scope: Scope = "global",
) -> dict[str, Tensor]:
    """Iterative SynFlow pruning (Tanaka et al. 2020, arXiv:2006.05467) to an exact count.

    On one linearised eval-mode copy (see :func:`synflow_scores`), for ``r = 1..rounds``: zero the pruned weights,
    recompute the SynFlow scores of the masked ``|·|`` network, and keep the top
    ``exact_count(density ** (r / rounds), N)`` among the entries still kept (exponential schedule, as in
    Synaptic-Flow; pruned entries never come back). The last round keeps exactly ``round(density * N)``
    (``scope="global"``) or ``round(density * n_l)`` per layer (``scope="layerwise"``). ``rounds=1`` is single-shot
    SynFlow followed by :func:`score_masks`.

    Args:
        model: the network; left exactly as it was.
        names: FQNs of the parameters to prune.
        density: final fraction kept, in (0, 1].
        input_shape: shape of one input sample without the batch dimension.
        rounds: number of prune-rescore rounds, >= 1 (100 in the paper).
        double: compute in float64.
        masks: optional starting masks (any parameters); pruned entries stay pruned.
        scope: ``"global"`` or ``"layerwise"`` top-k at every round.

    Returns:
        ``{fqn: bool tensor}`` for ``names``, placed like each parameter.

    Raises:
        ValueError: ``rounds < 1``, ``density`` outside (0, 1], missing ``input_shape``, unknown names, or a target
            above what ``masks`` keep.
    """
    _check_model(model)
    density = check_density(density)
    rounds = check_int(rounds, "rounds")
    _check_scope(scope)
    shape = _check_input_shape(input_shape)
    params = _check_names(model, names)
    mask_map = _check_masks(model, masks)
    names = list(params)
    with _isolated_rng(model), _grad_enabled():
        clone, tensors, dtype, tokens = _synflow_setup(model, names, mask_map, bool(double))
        base = [t.detach().clone() for t in tensors]  # |W| ⊙ M_initial
        current = {
            n: mask_map.get(n, torch.ones_like(t, dtype=torch.bool)).to(t.device)
            for n, t in zip(names, tensors)
        }
        # Fail before the rounds when the final target cannot be met.
        _targets(*_counts({n: t.shape for n, t in zip(names, tensors)}, current), density, scope, clip=False)
        for r in range(1, rounds + 1):
            with torch.no_grad():
                for n, t, b in zip(names, tensors, base):
                    t.copy_(b * current[n].to(b.dtype))
            scores = dict(zip(names, _synflow_pass(clone, tensors, shape, dtype, tokens)))
            target = density if r == rounds else density ** (r / rounds)
            current = _select(scores, target, scope, current, clip=r < rounds)
            report("synflow rounds", r, rounds, density=target)
    return {n: current[n].to(params[n].device) for n in names}


# --------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------


def _check_criterion(criterion: str) -> None:
    if criterion not in SCORE_CRITERIA:
        raise ValueError(f"unknown criterion {criterion!r}; valid criteria are {SCORE_CRITERIA}")


def compute_scores(
    criterion: Criterion,
    model: nn.Module,
    names: Sequence[str],
    *,
    batches: Iterable[Any] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    batch_loss: BatchLoss | None = None,
    num_batches: int = 1,
    temperature: float = 200.0,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    double: bool = False,
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Single-shot scores for ``criterion`` (one of :data:`SCORE_CRITERIA`); larger means keep.

    Each criterion reads only its own arguments: ``batches``/``loss_fn``/``batch_loss``/``num_batches`` (snip, grasp),
    ``temperature`` (grasp), ``input_shape``/``double`` (synflow), ``seed`` (random); ``masks`` applies to all.
    For iterative SynFlow use :func:`prune_at_init` or :func:`synflow_masks`.

    Raises:
        ValueError: unknown criterion (the valid ones are listed), missing ``batches`` for snip/grasp, missing
            ``input_shape`` for synflow, and every error of the chosen scorer.
    """
    _check_criterion(criterion)
    if criterion == "magnitude":
        return magnitude_scores(model, names, masks=masks)
    if criterion == "random":
        return random_scores(model, names, seed=seed, masks=masks)
    data: dict[str, Any] = {
        "loss_fn": loss_fn,
        "batch_loss": batch_loss,
        "num_batches": num_batches,
        "masks": masks,
    }
    if criterion == "snip":
        return snip_scores(model, names, batches, **data)
    if criterion == "grasp":
        return grasp_scores(model, names, batches, temperature=temperature, **data)
    return synflow_scores(model, names, input_shape=input_shape, masks=masks, double=double)


def prune_at_init(
    criterion: Criterion,
    model: nn.Module,
    names: Sequence[str],
    density: float,
    *,
    scope: Scope = "global",
    batches: Iterable[Any] | None = None,
    loss_fn: LossFn = F.cross_entropy,
    batch_loss: BatchLoss | None = None,
    num_batches: int = 1,
    temperature: float = 200.0,
    input_shape: Sequence[int] | None = None,
    seed: int = 0,
    rounds: int = 100,
    double: bool = False,
    masks: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """Masks from a pruning-at-initialisation criterion, keeping an exact number of weights.

    ``"synflow"`` runs iterative SynFlow with ``rounds`` rounds (:func:`synflow_masks`); every other criterion
    scores once (:func:`compute_scores`) and keeps the top scores (:func:`score_masks`). Entries pruned by
    ``masks`` stay pruned.

    Args:
        criterion: one of :data:`SCORE_CRITERIA`.
        model: the network; left exactly as it was.
        names: FQNs of the parameters to prune.
        density: fraction kept, in (0, 1]: of all ``names`` together (global) or of each (layerwise).
        scope: ``"global"`` (one threshold over all layers) or ``"layerwise"``.
        batches, loss_fn, batch_loss, num_batches, temperature: data for snip/grasp (see :func:`snip_scores`,
            :func:`grasp_scores`).
        input_shape, rounds, double: for synflow (see :func:`synflow_masks`).
        seed: for random.
        masks: optional current masks.

    Returns:
        ``{fqn: bool tensor}`` placed like each parameter; exactly ``round(density * N)`` set in total (global) or
        ``round(density * n_l)`` per layer (layerwise).

    Raises:
        ValueError: unknown criterion, ``density`` outside (0, 1], ``rounds < 1`` and the scorers' errors.
    """
    _check_criterion(criterion)
    density = check_density(density)
    _check_scope(scope)
    if criterion == "synflow":
        return synflow_masks(
            model,
            names,
            density,
            input_shape=input_shape,
            rounds=rounds,
            double=double,
            masks=masks,
            scope=scope,
        )
    scores = compute_scores(
        criterion,
        model,
        names,
        batches=batches,
        loss_fn=loss_fn,
        batch_loss=batch_loss,
        num_batches=num_batches,
        temperature=temperature,
        seed=seed,
        masks=masks,
    )
    own = None if masks is None else {n: m for n, m in masks.items() if n in scores}
    return score_masks(scores, density, scope=scope, masks=own)
