"""Named studies: grids of independent ``cli.py fit`` runs of the shipped configs, one run per (method, density, seed).

A :class:`Study` is data: every :class:`RunSpec` names the YAML configs it composes and the command-line overrides
that set its density, layer-ratio rule and seed. Nothing here trains; :mod:`er_lightning.reproduce.runner` turns
each spec into a plain ``python cli.py fit ...`` command.

Conventions shared by the studies:

* ``seed_everything`` and the sparsity callback's ``seed`` are both the run's seed (weights, data order and mask);
  the data split is the same for every seed.
* The x-axis is the run's **final** density. Methods that keep their density (StaticSparsity, SET, RigL, pruning at
  initialisation) draw their mask at it; methods that shrink a random source network (GraNet, Supermask,
  SoftThreshold) start from an ER mask at twice the final density (at most 1), drawn with the same rule and seed.
* ``dense`` is the same config at density 1 (every mask entry kept): the reference line of the figures.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from er_lightning.sparsity.checks import check_choice, check_density, check_int

__all__ = [
    "DIGITS_DENSITIES",
    "PAPER_DENSITIES",
    "RULES",
    "STUDIES",
    "RunSpec",
    "Study",
    "build_study",
]

#: Layer-ratio rules of the ratio studies, in the order the tables list them.
RULES: tuple[str, ...] = ("uniform", "er", "erk", "balanced", "pyramidal")
#: Densities of ``digits-ratios`` (fraction of conv/linear weights kept).
DIGITS_DENSITIES: tuple[float, ...] = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)
#: Densities of the CIFAR grids (the digits grid; the paper's sparsities 50 % ... 99 %).
PAPER_DENSITIES: tuple[float, ...] = DIGITS_DENSITIES

Overrides = Callable[[float, int], list[str]]


@dataclass(frozen=True)
class RunSpec:
    """One run of a study: configs composed with repeated ``--config`` plus overrides, and its labels.

    Args:
        group: table and figure this run belongs to (e.g. ``"small_cnn-digits"``).
        method: line in the figure / row in the table (a layer-ratio rule or a method name).
        density: final density, the x-axis.
        seed: run seed (``seed_everything`` and the callback's ``seed``).
        configs: YAML files relative to the repository root, in ``--config`` order.
        overrides: further ``cli.py`` arguments (``--trainer.callbacks.init_args.density=0.05``, ...).
        accelerator: ``"cpu"`` or ``"gpu"``: the trainer fragment the runner adds and how it places processes.

    Example:
        >>> spec = RunSpec("g", "erk", 0.1, 0, ("configs/digits/static.yaml",), ("--seed_everything=0",))
        >>> spec.run_id
        'g-erk-d0.1-s0'
    """

    group: str
    method: str
    density: float
    seed: int
    configs: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    accelerator: str = "cpu"

    @property
    def run_id(self) -> str:
        """Folder name of the run inside the study's ``runs/``: ``<group>-<method>-d<density>-s<seed>``."""
        return f"{self.group}-{self.method}-d{self.density:g}-s{self.seed}"


@dataclass(frozen=True)
class Study:
    """A named grid of runs.

    Args:
        name: the study's name (its folder under ``--out``).
        description: one line for ``--help``-style listings and the results file.
        runs: every run, in execution order.
        methods: the order of methods in tables and figure legends.
        notes: lines written under the study's title in ``results.md`` (settings a reader needs).

    Example:
        >>> study = build_study("digits-ratios", densities=[0.1], methods=["erk"], seeds=[0])
        >>> [r.run_id for r in study.runs]
        ['small_cnn-digits-erk-d0.1-s0']
    """

    name: str
    description: str
    runs: tuple[RunSpec, ...]
    methods: tuple[str, ...]
    notes: tuple[str, ...] = field(default=())


def _cb(**values: object) -> list[str]:
    """``--trainer.callbacks.init_args.<key>=<value>`` for the config's (last) sparsity callback."""
    return [f"--trainer.callbacks.init_args.{key}={_fmt(value)}" for key, value in values.items()]


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _source(density: float) -> float:
    """Density of the random source network of a shrinking method: twice the final density, at most 1."""
    return min(1.0, 2.0 * density)


def _seeded(seed: int, *rest: str) -> list[str]:
    return [f"--seed_everything={seed}", *rest]


# ------------------------------------------------------------------------------------------------ method table
# Each entry: config file(s) and a function (density, seed) -> overrides. ``rule`` is the ER start's layer ratios.


def _static(rule: str) -> Overrides:
    return lambda d, s: _seeded(s, *_cb(density=d, distribution=rule, seed=s))


def _fixed_density(**extra: object) -> Overrides:
    return lambda d, s: _seeded(s, *_cb(density=d, seed=s, **extra))


def _granet(rule: str) -> Overrides:
    return lambda d, s: _seeded(s, *_cb(init_density=_source(d), final_density=d, distribution=rule, seed=s))


def _supermask(rule: str) -> Overrides:
    return lambda d, s: _seeded(s, *_cb(density=d, er_density=_source(d), distribution=rule, seed=s))


def _soft_threshold(rule: str, **extra: object) -> Overrides:
    return lambda d, s: _seeded(
        s, *_cb(density=_source(d), target_density=d, distribution=rule, seed=s, **extra)
    )


# The shipped STR configs write densities and masks to one fixed path; parallel runs of a grid must not share it.
_NO_STR_FILES = {"densities_out": "null", "masks_out": "null"}


def _grid(
    group: str,
    entries: Sequence[tuple[str, tuple[str, ...], Overrides]],
    densities: Sequence[float],
    seeds: Sequence[int],
    accelerator: str,
    dense: tuple[tuple[str, ...], Overrides] | None,
) -> list[RunSpec]:
    runs = [
        RunSpec(group, method, d, s, configs, tuple(make(d, s)), accelerator)
        for method, configs, make in entries
        for d in densities
        for s in seeds
    ]
    if dense is not None:
        configs, make = dense
        runs += [RunSpec(group, "dense", 1.0, s, configs, tuple(make(1.0, s)), accelerator) for s in seeds]
    return runs


def _assemble(
    name: str,
    description: str,
    group: str,
    entries: Sequence[tuple[str, tuple[str, ...], Overrides]],
    dense: tuple[tuple[str, ...], Overrides],
    order: tuple[str, ...],
    chosen: tuple[Sequence[float], Sequence[str], Sequence[int]],
    accelerator: str,
    notes: str,
) -> Study:
    """A one-group study from its method table, keeping the chosen methods in the table's ``order``."""
    densities, methods, seeds = chosen
    picked = [e for e in entries if e[0] in methods]
    runs = _grid(group, picked, densities, seeds, accelerator, dense if "dense" in methods else None)
    return Study(name, description, tuple(runs), tuple(m for m in order if m in methods), (notes,))


DIGITS_METHODS: tuple[str, ...] = (
    "static",
    "er_snip",
    "snip",
    "rigl",
    "granet",
    "supermask",
    "soft_threshold",
)
_DIGITS_STATIC = ("configs/digits/static.yaml",)


def _digits_ratios(densities: Sequence[float], methods: Sequence[str], seeds: Sequence[int]) -> Study:
    return _assemble(
        "digits-ratios",
        "StaticSparsity with each layer-ratio rule across densities (small CNN, scikit-learn digits, CPU)",
        "small_cnn-digits",
        [(rule, _DIGITS_STATIC, _static(rule)) for rule in RULES],
        (_DIGITS_STATIC, _static("uniform")),
        (*RULES, "dense"),
        (densities, methods, seeds),
        "cpu",
        "configs/digits/static.yaml: small CNN (288 + 18,432 + 10,240 masked weights), SGD 0.05 Nesterov, cosine, "
        "batch 64; accuracy of the last epoch on the 360 held-out test digits.",
    )


def _digits_methods(densities: Sequence[float], methods: Sequence[str], seeds: Sequence[int]) -> Study:
    rule = "erk"
    makers = {
        "static": _static(rule),
        "er_snip": _fixed_density(),
        "snip": _fixed_density(),
        "rigl": _static(rule),
        "granet": _granet(rule),
        "supermask": _supermask(rule),
        "soft_threshold": _soft_threshold(rule),
    }
    return _assemble(
        "digits-methods",
        "ER (ERK) start: static vs ER_snip vs SNIP vs RigL vs GraNet vs Supermask vs SoftThreshold (digits, CPU)",
        "small_cnn-digits",
        [(m, (f"configs/digits/{m}.yaml",), makers[m]) for m in DIGITS_METHODS],
        (_DIGITS_STATIC, _static("uniform")),
        (*DIGITS_METHODS, "dense"),
        (densities, methods, seeds),
        "cpu",
        "configs/digits/*.yaml; every ER mask uses ERK ratios and the run's seed. GraNet, Supermask and "
        "SoftThreshold start from an ER source at twice the final density and end at it.",
    )


_ADD_STATIC = "--trainer.callbacks+=er_lightning.callbacks.StaticSparsity"

CIFAR10_METHODS: tuple[str, ...] = (
    *RULES,
    "er_snip",
    "snip",
    "er_synflow",
    "synflow",
    "set",
    "rigl",
    "str",
    "slt",
    "dense",
)
CIFAR100_METHODS: tuple[str, ...] = (*RULES, "granet", "str", "dense")


def _base_static(base: str, rule: str) -> tuple[str, tuple[str, ...], Overrides]:
    """A dense base config plus a StaticSparsity callback added on the command line."""
    return (
        rule,
        (base,),
        lambda d, s: _seeded(s, _ADD_STATIC, *_cb(density=d, distribution=rule, seed=s)),
    )


def _cifar10_paper(densities: Sequence[float], methods: Sequence[str], seeds: Sequence[int]) -> Study:
    base = "configs/base/resnet18_cifar10.yaml"
    entries: list[tuple[str, tuple[str, ...], Overrides]] = [_base_static(base, rule) for rule in RULES]
    entries += [
        ("er_snip", ("configs/pai/er_snip_resnet18_cifar10.yaml",), _fixed_density()),
        ("snip", ("configs/pai/snip_resnet18_cifar10.yaml",), _fixed_density()),
        ("er_synflow", ("configs/pai/er_synflow_resnet18_cifar10.yaml",), _fixed_density()),
        ("synflow", ("configs/pai/synflow_resnet18_cifar10.yaml",), _fixed_density()),
        ("set", ("configs/er_dst/set_resnet18_cifar10_erk.yaml",), _fixed_density()),
        ("rigl", ("configs/er_dst/rigl_resnet18_cifar10_pyramidal.yaml",), _fixed_density()),
        ("str", ("configs/str/resnet18_cifar10_erk.yaml",), _soft_threshold("erk", **_NO_STR_FILES)),
        ("slt", ("configs/er_slt/resnet18_cifar10.yaml",), _supermask("uniform")),
    ]
    return _assemble(
        "cifar10-paper",
        "ResNet-18 on CIFAR-10: layer-ratio rules and methods from ER starts (needs the data and GPUs)",
        "resnet18-cifar10",
        entries,
        ((base,), lambda d, s: _seeded(s)),
        CIFAR10_METHODS,
        (densities, methods, seeds),
        "gpu",
        "Shipped configs (configs/base/resnet18_cifar10.yaml, configs/pai, configs/er_dst, configs/str, "
        "configs/er_slt) with density and seed overridden; accuracy of the last epoch on the test set.",
    )


def _cifar100_paper(densities: Sequence[float], methods: Sequence[str], seeds: Sequence[int]) -> Study:
    entries: list[tuple[str, tuple[str, ...], Overrides]] = [
        (rule, (f"configs/er_wlt/resnet50_cifar100_{rule}.yaml",), _fixed_density()) for rule in RULES
    ]
    entries += [
        ("granet", ("configs/er_dst/granet_resnet50_cifar100_erk.yaml",), _granet("erk")),
        ("str", ("configs/str/resnet50_cifar100_erk.yaml",), _soft_threshold("erk", **_NO_STR_FILES)),
    ]
    return _assemble(
        "cifar100-paper",
        "ResNet-50 on CIFAR-100: ER weak tickets per layer-ratio rule, GraNet and STR from ER starts (data, GPUs)",
        "resnet50-cifar100",
        entries,
        (("configs/base/resnet50_cifar100.yaml",), lambda d, s: _seeded(s)),
        CIFAR100_METHODS,
        (densities, methods, seeds),
        "gpu",
        "Shipped configs (configs/er_wlt/resnet50_cifar100_*.yaml, configs/er_dst, configs/str) with density "
        "and seed overridden; accuracy of the last epoch on the test set.",
    )


_Builder = Callable[[Sequence[float], Sequence[str], Sequence[int]], Study]

#: name -> (builder, default densities, default methods, default seeds)
STUDIES: dict[str, tuple[_Builder, tuple[float, ...], tuple[str, ...], tuple[int, ...]]] = {
    "digits-ratios": (_digits_ratios, DIGITS_DENSITIES, (*RULES, "dense"), (0, 1, 2)),
    "digits-methods": (_digits_methods, (0.1, 0.02), (*DIGITS_METHODS, "dense"), (0, 1, 2)),
    "cifar10-paper": (_cifar10_paper, PAPER_DENSITIES, CIFAR10_METHODS, (1, 2, 3)),
    "cifar100-paper": (_cifar100_paper, PAPER_DENSITIES, CIFAR100_METHODS, (1, 2, 3)),
}


def build_study(
    name: str,
    *,
    densities: Sequence[float] | None = None,
    methods: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> Study:
    """Build a named study, optionally restricted to some densities, methods and seeds.

    Args:
        name: one of :data:`STUDIES` (``digits-ratios``, ``digits-methods``, ``cifar10-paper``, ``cifar100-paper``).
        densities: final densities to run, each in (0, 1]; ``None`` = the study's grid.
        methods: methods (layer-ratio rules or method names) to run, a subset of the study's; ``None`` = all.
        seeds: run seeds (ints >= 0); ``None`` = the study's seeds.

    Returns:
        The :class:`Study`, runs ordered method-major, then density, then seed.

    Raises:
        ValueError: unknown study or method, a density outside (0, 1], an empty or repeated selection.
        TypeError: a seed that is not an int.

    Example:
        >>> study = build_study("digits-ratios", densities=[0.5, 0.1], methods=["uniform", "erk"], seeds=[0])
        >>> len(study.runs), study.methods
        (4, ('uniform', 'erk'))
    """
    check_choice(name, "study", list(STUDIES))
    builder, default_densities, default_methods, default_seeds = STUDIES[name]
    chosen_densities = tuple(default_densities if densities is None else densities)
    chosen_methods = tuple(default_methods if methods is None else methods)
    chosen_seeds = tuple(default_seeds if seeds is None else seeds)
    for what, values in (
        ("densities", chosen_densities),
        ("methods", chosen_methods),
        ("seeds", chosen_seeds),
    ):
        if not values:
            raise ValueError(f"{what} of study {name!r} must not be empty")
        if len(set(values)) != len(values):
            raise ValueError(f"{what} of study {name!r} must not repeat a value, got {list(values)}")
    for d in chosen_densities:
        check_density(d, "each density")
    for m in chosen_methods:
        check_choice(m, f"method of study {name!r}", default_methods)
    for s in chosen_seeds:
        check_int(s, "each seed", minimum=0)
    return builder(chosen_densities, chosen_methods, chosen_seeds)
