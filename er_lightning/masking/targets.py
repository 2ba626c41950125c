"""Which parameters carry a mask, named by fully qualified name (FQN) as ``named_parameters()`` yields them."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence

from torch import nn
from torch.nn.utils import parametrize

from er_lightning.sparsity.checks import check_patterns

__all__ = [
    "EMBEDDING_MODULES",
    "LARGE_SHARE",
    "MATMUL_MODULES",
    "PARAMETRIZED_NAME",
    "default_targets",
    "large_dense_parameters",
    "original_fqn",
    "original_named_parameters",
    "parameter_aliases",
    "select_targets",
]

#: Modules whose ``weight`` a matmul or a convolution consumes (``isinstance``, so subclasses such as
#: ``NonDynamicallyQuantizableLinear`` (``MultiheadAttention.out_proj``), lazy and parametrized variants count).
MATMUL_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
#: Lookup tables, masked only on request (``embeddings=True``): a lookup is a gather, not a matmul.
EMBEDDING_MODULES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)
#: ``nn.MultiheadAttention``'s projection weights: packed ``in_proj_weight`` (3E × E) when query, key and value
#: share the embedding size, else the separate ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``. The output
#: projection ``out_proj`` is an ``nn.Linear`` and counts as one.
_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")
#: ``<module>.parametrizations.<tensor>.original``: where ``torch.nn.utils.parametrize`` keeps a tensor.
PARAMETRIZED_NAME = re.compile(r"(^|\.)parametrizations\.([^.]+)\.original$")
#: Share of all parameters above which a tensor the default rule leaves dense is reported.
LARGE_SHARE = 0.1


def original_fqn(name: str) -> str:
    """``a.b.parametrizations.weight.original`` → ``a.b.weight``; other names are returned unchanged.

    Masks, checkpoints and logs keep the name a tensor had before a parametrization (supermask scores, STR
    thresholds) was attached to it.
    """
    return PARAMETRIZED_NAME.sub(lambda m: f"{m.group(1)}{m.group(2)}", name)


def original_named_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """``named_parameters()`` keyed by :func:`original_fqn`, so parametrized weights keep their plain names."""
    return {original_fqn(n): p for n, p in model.named_parameters()}


def _consumed_weights(module: nn.Module, embeddings: bool) -> list[str]:
    """Names of ``module``'s own tensors that a matmul/convolution (or, with ``embeddings``, a lookup) consumes."""
    if isinstance(module, MATMUL_MODULES):
        return ["weight"]
    if isinstance(module, nn.MultiheadAttention):
        return list(_ATTENTION_WEIGHTS)
    if isinstance(module, nn.RNNBase):
        return [n for n in module._flat_weights_names if n.startswith("weight_")]
    if embeddings and isinstance(module, EMBEDDING_MODULES):
        return ["weight"]
    return []


def _own_parameter(module: nn.Module, attr: str) -> nn.Parameter | None:
    """The parameter stored under ``attr`` (its ``original`` if parametrized), or ``None`` if there is none."""
    if parametrize.is_parametrized(module, attr):
        original = module.parametrizations[attr].original  # type: ignore[union-attr,index]
        return original if isinstance(original, nn.Parameter) else None
    value = module._parameters.get(attr)
    return value if isinstance(value, nn.Parameter) else None


def parameter_aliases(model: nn.Module) -> dict[str, list[str]]:
    """Shared parameters: FQN as ``named_parameters()`` yields it → the other names of the same tensor.

    ``named_parameters()`` yields a tensor registered under several names (a language-model head tied to the
    embedding: ``head.weight is embed.weight``) once, under the name it was first registered with; that name is
    the one key of its mask, density and log entries. Unshared parameters are not listed.

    Example:
        >>> emb, head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)
        >>> head.weight = emb.weight
        >>> parameter_aliases(nn.ModuleDict({"embed": emb, "head": head}))
        {'embed.weight': ['head.weight']}
    """
    first: dict[int, str] = {}
    aliases: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owner = first.setdefault(id(p), name)
        if owner != name:
            aliases.setdefault(owner, []).append(name)
    return aliases


def default_targets(model: nn.Module, embeddings: bool = False) -> list[str]:
    """FQNs of every weight a matmul or a convolution consumes, in ``named_parameters()`` order.

    The rule: the ``weight`` of every ``nn.Linear``, ``nn.Bilinear`` and convolution (``Conv1d/2d/3d`` and the
    transposed ones), the projection weights of ``nn.MultiheadAttention`` (packed ``in_proj_weight`` or separate
    ``q/k/v_proj_weight``; ``out_proj`` is an ``nn.Linear``), the input-hidden and hidden-hidden weights of
    ``nn.RNN``/``nn.LSTM``/``nn.GRU``, in any container (``Sequential``, ``ModuleList``, ``ModuleDict``,
    ``nn.TransformerEncoderLayer``, ...). Biases and normalisation parameters never. ``nn.Embedding`` and
    ``nn.EmbeddingBag`` tables only with ``embeddings=True``: a lookup gathers rows and multiplies nothing, so
    masking a table saves memory but no compute; a table tied to a linear head is a matmul weight and is masked
    either way. ``isinstance`` is used, so subclasses and parametrized modules count (a parametrized weight is
    named ``<module>.parametrizations.weight.original``). A parameter shared by several modules appears once,
    under the name ``named_parameters()`` gives it (see :func:`parameter_aliases`). Tensors a custom module uses
    in its own ``forward`` (a bare ``nn.Parameter``) cannot be recognised: name them with ``include``;
    :func:`large_dense_parameters` finds the large ones left out.

    Args:
        model: any module.
        embeddings: also mask embedding tables.

    Raises:
        ValueError: a lazy module is not initialised yet (its shape is unknown).

    Example:
        >>> net = nn.Sequential(nn.Embedding(50, 8), nn.MultiheadAttention(8, 2), nn.LayerNorm(8))
        >>> default_targets(net)
        ['1.in_proj_weight', '1.out_proj.weight']
        >>> default_targets(net, embeddings=True)[0]
        '0.weight'
    """
    chosen: set[int] = set()
    for mod_name, module in model.named_modules():
        for attr in _consumed_weights(module, embeddings):
            p = _own_parameter(module, attr)
            if p is None:
                continue
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(
                    f"{mod_name or 'the model'}.{attr} is an uninitialised lazy parameter, so its shape and mask "
                    "are unknown; run one forward pass (e.g. on a dummy batch in the module's __init__) before "
                    "fitting with a sparsity callback"
                )
            chosen.add(id(p))
    return [n for n, p in model.named_parameters() if id(p) in chosen]


def large_dense_parameters(
    model: nn.Module, targets: Sequence[str], share: float = LARGE_SHARE
) -> dict[str, int]:
    """Parameters not in ``targets`` holding at least ``share`` of all the model's parameters: FQN → numel.

    The total counts each shared tensor once. Used to warn when the default rule leaves a large tensor dense (an
    untied embedding table, a bare ``nn.Parameter`` a custom layer multiplies by).
    """
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    chosen = set(targets)
    return {n: p.numel() for n, p in params.items() if n not in chosen and p.numel() >= share * total}


def _matches(names: Sequence[str], pattern: str, aliases: dict[str, list[str]]) -> list[str]:
    """Names in ``names`` matching ``pattern`` by their own FQN or by any alias of the same tensor."""
    return [n for n in names if any(fnmatch.fnmatchcase(a, pattern) for a in (n, *aliases.get(n, ())))]


def select_targets(
    model: nn.Module,
    candidates: Sequence[str] | None = None,
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    dense_first_layer: bool = False,
    dense_last_layer: bool = False,
    embeddings: bool = False,
) -> list[str]:
    """Choose the parameters to mask.

    Args:
        model: the module whose ``named_parameters()`` give the names.
        candidates: the starting set; defaults to :func:`default_targets`.
        include: glob patterns (``fnmatch``) over parameter names; when given, these replace ``candidates``
            (any parameter may be named, e.g. a bias). A shared tensor matches by any of its names and is masked
            once, under its ``named_parameters()`` name.
        exclude: glob patterns removed from the set (also matched against every name of a shared tensor).
        dense_first_layer: leave the first selected layer dense (not masked).
        dense_last_layer: leave the last selected layer dense. Order is ``named_parameters()`` order, where a
            tied head sits at its embedding's place.
        embeddings: passed to :func:`default_targets` when ``candidates`` is not given.

    Returns:
        FQNs in ``named_parameters()`` order.

    Raises:
        TypeError: ``include``/``exclude`` is a string rather than a list of patterns.
        ValueError: a pattern matches no parameter (the message lists the names that exist), or nothing is left.
    """
    include = check_patterns(include, "include")
    exclude = check_patterns(exclude, "exclude")
    all_names = [n for n, _ in model.named_parameters()]
    aliases = parameter_aliases(model)
    base = list(candidates) if candidates is not None else default_targets(model, embeddings=embeddings)
    if include:
        chosen: list[str] = []
        for pattern in include:
            hits = _matches(all_names, pattern, aliases)
            if not hits:
                raise ValueError(
                    f"include pattern {pattern!r} matches no parameter; the model's parameters are: {all_names}"
                )
            chosen.extend(h for h in hits if h not in chosen)
        base = [n for n in all_names if n in chosen]
    for pattern in exclude or ():
        hits = _matches(base, pattern, aliases)
        if not hits:
            raise ValueError(
                f"exclude pattern {pattern!r} matches none of the masked parameters {base}; "
                f"the model's parameters are: {all_names}"
            )
        base = [n for n in base if n not in hits]
    if dense_first_layer and base:
        base = base[1:]
    if dense_last_layer and base:
        base = base[:-1]
    if not base:
        raise ValueError(
            "no parameter is left to mask; the model has no matmul/conv weights or include/exclude/"
            f"dense_first_layer/dense_last_layer removed them all. Parameters: {all_names}"
        )
    return base
