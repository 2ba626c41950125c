"""Layer-wise density rules against hand-worked values and upstream's golden figures (spec §2, §3.8, §5.2)."""

from __future__ import annotations

import math

import pytest
from shapes import (
    RESNET18_NUMEL,
    RESNET50_NUMEL,
    VGG16_NUMEL,
    resnet18_shapes,
    resnet50_shapes,
    total_numel,
    vgg16_shapes,
)

from er_lightning.sparsity.distributions import DENSITY_METHODS, expected_density, layer_densities

MODELS = {"resnet18": resnet18_shapes, "vgg16": vgg16_shapes, "resnet50": resnet50_shapes}
DENSITIES = (0.01, 0.05, 0.2)


# --------------------------------------------------------------------------------------------- shape tables


@pytest.mark.parametrize(
    ("factory", "count", "numel"),
    [
        (resnet18_shapes, 21, RESNET18_NUMEL),
        (vgg16_shapes, 14, VGG16_NUMEL),
        (resnet50_shapes, 54, RESNET50_NUMEL),
    ],
)
def test_shape_tables_match_upstream_totals(factory, count, numel):
    shapes = factory()
    assert len(shapes) == count
    assert total_numel(shapes) == numel
    assert list(shapes)[-1] == "classifier.weight"


def test_resnet18_names_in_module_order():
    names = list(resnet18_shapes())
    assert names[:3] == ["conv1.weight", "layer1.0.conv1.weight", "layer1.0.conv2.weight"]
    i = names.index("layer2.0.shortcut.0.weight")
    assert names[i - 2 : i + 2] == [
        "layer2.0.conv1.weight",
        "layer2.0.conv2.weight",
        "layer2.0.shortcut.0.weight",
        "layer2.1.conv1.weight",
    ]
    assert list(vgg16_shapes())[:3] == ["feature.0.weight", "feature.3.weight", "feature.7.weight"]


# --------------------------------------------------------------------------------------------- hand-worked

# A: 10x10 (n=100, ERK score 20/100 = 0.2), B: 100x100 (n=10000, score 200/10000 = 0.02); N = 10100.
TWO = {"a": (10, 10), "b": (100, 100)}


def test_erk_hand_worked_without_overflow():
    # d=0.1: budget 1010, Σ r n = 20 + 200 = 220, eps = 1010/220; eps*0.2 = 0.918 < 1.
    got = layer_densities(TWO, 0.1, "erk")
    eps = 1010 / 220
    assert got == pytest.approx({"a": 0.2 * eps, "b": 0.02 * eps}, rel=1e-12)


def test_erk_hand_worked_with_overflow_redistributes():
    # d=0.2: eps = 2020/220 = 9.18, eps*0.2 > 1 -> a dense; b gets (2020 - 100)/10000 = 0.192.
    got = layer_densities(TWO, 0.2, "erk")
    assert got["a"] == 1.0
    assert got["b"] == pytest.approx(0.192, rel=1e-12)


def test_erk_clamped_hand_worked_undershoots():
    # STR rule: C = 2020/220, a clamped to 1, b = 0.02*C = 0.18364 (no redistribution).
    got = layer_densities(TWO, 0.2, "erk", redistribute=False)
    assert got["a"] == 1.0
    assert got["b"] == pytest.approx(0.02 * 2020 / 220, rel=1e-6)
    assert expected_density(TWO, got) == pytest.approx((100 + 200 * 2020 / 220) / 10100, rel=1e-6)
    assert expected_density(TWO, got) < 0.2


def test_balanced_hand_worked():
    # X = 0.2*10100/2 = 1010 >= 100 -> a dense. Upstream: b = 1010/10000; redistributed: b = 1920/10000.
    assert layer_densities(TWO, 0.2, "balanced", redistribute=False) == pytest.approx({"a": 1.0, "b": 0.101})
    assert layer_densities(TWO, 0.2, "balanced") == pytest.approx({"a": 1.0, "b": 0.192})
    # d=0.005: X = 25.25 kept weights in each layer, nothing capped.
    assert layer_densities(TWO, 0.005, "balanced") == pytest.approx({"a": 0.2525, "b": 0.002525})


def test_balanced_redistribution_repeats_until_feasible():
    # N = 1 + 250 + 1000 = 1251, d = 0.5, budget 625.5. Round 1: X = 208.5 -> only "tiny" is capped.
    # Round 2: X = (625.5 - 1)/2 = 312.25 >= 250 -> "mid" capped. Round 3: "big" takes 625.5 - 251 = 374.5 of 1000.
    shapes = {"tiny": (1, 1), "mid": (10, 25), "big": (10, 100)}
    assert layer_densities(shapes, 0.5, "balanced") == pytest.approx({"tiny": 1.0, "mid": 1.0, "big": 0.3745})
    upstream = layer_densities(shapes, 0.5, "balanced", redistribute=False)
    assert upstream == pytest.approx({"tiny": 1.0, "mid": 208.5 / 250, "big": 0.2085})


def test_er_ignores_kernel_dims_and_erk_counts_them():
    shapes = {"conv": (8, 4, 3, 3), "fc": (10, 8)}
    er = layer_densities(shapes, 0.1, "er")
    erk = layer_densities(shapes, 0.1, "erk")
    # ER ratio conv/fc = (12/32) / (18/80); ERK ratio = (18/288) / (18/80).
    assert er["conv"] / er["fc"] == pytest.approx((12 / 32) / (18 / 80), rel=1e-12)
    assert erk["conv"] / erk["fc"] == pytest.approx((18 / 288) / (18 / 80), rel=1e-12)


def test_pyramidal_hand_worked_golden_ratio():
    # n1 = n2 = 1, d = 0.5: r + r^2 = 1 -> r = (sqrt(5) - 1)/2.
    got = layer_densities({"a": (1,), "b": (1,)}, 0.5, "pyramidal")
    r = (math.sqrt(5) - 1) / 2
    assert got["a"] == pytest.approx(r, abs=1e-14)
    assert got["b"] == pytest.approx(r * r, abs=1e-14)


def test_erk_power_scale_zero_is_uniform_and_softens():
    shapes = resnet18_shapes()
    flat = layer_densities(shapes, 0.05, "erk", power_scale=0.0)
    assert all(v == pytest.approx(0.05, rel=1e-12) for v in flat.values())
    soft = layer_densities(shapes, 0.05, "erk", power_scale=0.5)
    hard = layer_densities(shapes, 0.05, "erk")
    spread = lambda d: max(d.values()) / min(d.values())  # noqa: E731
    assert spread(flat) < spread(soft) < spread(hard)


def test_uniform_and_custom():
    shapes = vgg16_shapes()
    assert layer_densities(shapes, 0.05, "uniform") == dict.fromkeys(shapes, 0.05)
    custom = {n: i / 20 for i, n in enumerate(shapes)}
    assert layer_densities(shapes, 0.3, "custom", custom=custom) == custom


def test_keys_and_order_preserved():
    shapes = resnet50_shapes()
    for method in ("uniform", "er", "erk", "balanced", "pyramidal"):
        assert list(layer_densities(shapes, 0.05, method)) == list(shapes)


@pytest.mark.parametrize("method", ["uniform", "er", "erk", "balanced", "pyramidal"])
def test_density_one_is_dense(method):
    got = layer_densities(resnet18_shapes(), 1.0, method)
    assert all(v == pytest.approx(1.0, abs=1e-12) for v in got.values())


# --------------------------------------------------------------------------------------------- exact budget


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("method", ["uniform", "er", "erk", "balanced", "pyramidal"])
def test_redistribute_hits_the_budget_exactly(model, density, method):
    shapes = MODELS[model]()
    got = layer_densities(shapes, density, method)
    assert all(0.0 <= v <= 1.0 for v in got.values())
    kept = math.fsum(got[n] * math.prod(s) for n, s in shapes.items())
    assert kept == pytest.approx(density * total_numel(shapes), rel=1e-9)
    assert expected_density(shapes, got) == pytest.approx(density, rel=1e-9)


@pytest.mark.parametrize("model", list(MODELS))
@pytest.mark.parametrize("method", ["er", "erk", "balanced"])
def test_upstream_rules_never_overshoot(model, method):
    shapes = MODELS[model]()
    for density in DENSITIES:
        got = layer_densities(shapes, density, method, redistribute=False)
        assert all(0.0 <= v <= 1.0 for v in got.values())
        assert expected_density(shapes, got) <= density + 1e-7


# --------------------------------------------------------------------------------------------- §3.8 tables

# Per-layer ER_DST targets at d = 0.05 (4 decimals). ERK redistributes; balanced is upstream's capped rule.
VGG16_TABLE = {
    # name: (ERK, balanced, pyramid)
    "feature.0.weight": (1.0, 1.0, 0.7214),
    "feature.3.weight": (0.3335, 1.0, 0.5204),
    "feature.7.weight": (0.2464, 0.7128, 0.3754),
    "feature.10.weight": (0.1630, 0.3564, 0.2708),
    "feature.14.weight": (0.1213, 0.1782, 0.1954),
    "feature.17.weight": (0.0806, 0.0891, 0.1409),
    "feature.20.weight": (0.0806, 0.0891, 0.1017),
    "feature.24.weight": (0.0602, 0.0446, 0.0733),
    "feature.27.weight": (0.0401, 0.0223, 0.0529),
    "feature.30.weight": (0.0401, 0.0223, 0.0382),
    "feature.34.weight": (0.0401, 0.0223, 0.0275),
    "feature.37.weight": (0.0401, 0.0223, 0.0199),
    "feature.40.weight": (0.0401, 0.0223, 0.0143),
    "classifier.weight": (1.0, 1.0, 0.0103),
}

RESNET18_TABLE = {
    "conv1.weight": (1.0, 1.0, 0.8184),
    "layer1.0.conv1.weight": (0.2327, 0.7211, 0.6697),
    "layer1.0.conv2.weight": (0.2327, 0.7211, 0.5481),
    "layer1.1.conv1.weight": (0.2327, 0.7211, 0.4485),
    "layer1.1.conv2.weight": (0.2327, 0.7211, 0.3671),
    "layer2.0.conv1.weight": (0.1719, 0.3605, 0.3004),
    "layer2.0.conv2.weight": (0.1138, 0.1803, 0.2458),
    "layer2.0.shortcut.0.weight": (1.0, 1.0, 0.2012),
    "layer2.1.conv1.weight": (0.1138, 0.1803, 0.1646),
    "layer2.1.conv2.weight": (0.1138, 0.1803, 0.1347),
    "layer3.0.conv1.weight": (0.0847, 0.0901, 0.1103),
    "layer3.0.conv2.weight": (0.0562, 0.0451, 0.0902),
    "layer3.0.shortcut.0.weight": (0.7542, 0.8112, 0.0738),
    "layer3.1.conv1.weight": (0.0562, 0.0451, 0.0604),
    "layer3.1.conv2.weight": (0.0562, 0.0451, 0.0495),
    "layer4.0.conv1.weight": (0.0420, 0.0225, 0.0405),
    "layer4.0.conv2.weight": (0.0280, 0.0113, 0.0331),
    "layer4.0.shortcut.0.weight": (0.3761, 0.2028, 0.0271),
    "layer4.1.conv1.weight": (0.0280, 0.0113, 0.0222),
    "layer4.1.conv2.weight": (0.0280, 0.0113, 0.0182),
    "classifier.weight": (1.0, 1.0, 0.0149),
}


@pytest.mark.parametrize(
    ("factory", "table"), [(vgg16_shapes, VGG16_TABLE), (resnet18_shapes, RESNET18_TABLE)]
)
def test_per_layer_tables_at_005(factory, table):
    shapes = factory()
    assert list(table) == list(shapes)
    erk = layer_densities(shapes, 0.05, "erk")
    balanced = layer_densities(shapes, 0.05, "balanced", redistribute=False)
    pyramid = layer_densities(shapes, 0.05, "pyramidal")
    uniform = layer_densities(shapes, 0.05, "uniform")
    for name, (e, b, p) in table.items():
        assert erk[name] == pytest.approx(e, abs=5e-5), name
        assert balanced[name] == pytest.approx(b, abs=5e-5), name
        assert pyramid[name] == pytest.approx(p, abs=5e-5), name
        assert uniform[name] == 0.05


# --------------------------------------------------------------------------------------------- overall golden

BALANCED_GOLDEN = {
    "resnet18": (0.009661, 0.044204, 0.138380),
    "vgg16": (0.009037, 0.042256, 0.146572),
    "resnet50": (0.009876, 0.046995, 0.159489),
}


@pytest.mark.parametrize("model", list(BALANCED_GOLDEN))
def test_balanced_upstream_overall_golden(model):
    shapes = MODELS[model]()
    for density, golden in zip(DENSITIES, BALANCED_GOLDEN[model]):
        got = expected_density(shapes, layer_densities(shapes, density, "balanced", redistribute=False))
        assert got == pytest.approx(golden, abs=1e-6)


@pytest.mark.parametrize("model", list(MODELS))
def test_erk_dst_overall_is_exact(model):
    shapes = MODELS[model]()
    for density in DENSITIES:
        assert expected_density(shapes, layer_densities(shapes, density, "erk")) == pytest.approx(
            density, abs=1e-9
        )


# STR's models end in a 1x1 conv classifier (shape (C, F, 1, 1)), which adds 2 to its ERK score.
STR_ERK_GOLDEN = [
    ("resnet18", 0.01, 0.009894),
    ("resnet18", 0.05, 0.047083),
    ("resnet18", 0.2, 0.174039),
    ("resnet50", 0.01, 0.01),
    ("resnet50", 0.05, 0.05),
    ("resnet50", 0.2, 0.195981),
]


@pytest.mark.parametrize(("model", "density", "golden"), STR_ERK_GOLDEN)
def test_str_clamped_erk_golden(model, density, golden):
    shapes = MODELS[model](conv_classifier=True)
    got = expected_density(shapes, layer_densities(shapes, density, "erk", redistribute=False))
    assert got == pytest.approx(golden, abs=1e-6)


def test_str_clamped_erk_dense_layers():
    shapes = resnet18_shapes(conv_classifier=True)
    dense = {
        d: [n for n, v in layer_densities(shapes, d, "erk", redistribute=False).items() if v == 1.0]
        for d in DENSITIES
    }
    assert dense[0.01] == ["classifier.weight"]
    assert dense[0.05] == ["conv1.weight", "layer2.0.shortcut.0.weight", "classifier.weight"]
    assert dense[0.2] == [
        "conv1.weight",
        "layer2.0.shortcut.0.weight",
        "layer3.0.shortcut.0.weight",
        "layer4.0.shortcut.0.weight",
        "classifier.weight",
    ]


PYRAMID_R_GOLDEN = {
    "resnet18": (0.69838, 0.81837, 0.90403),
    "vgg16": (0.57618, 0.72138, 0.84698),
    "resnet50": (0.85851, 0.92136, 0.96046),
}


@pytest.mark.parametrize("model", list(PYRAMID_R_GOLDEN))
def test_pyramid_ratio_golden(model):
    shapes = MODELS[model]()
    names = list(shapes)
    for density, r in zip(DENSITIES, PYRAMID_R_GOLDEN[model]):
        got = layer_densities(shapes, density, "pyramidal")
        assert got[names[0]] == pytest.approx(r, abs=1e-5)  # d_1 = r
        assert got[names[-1]] == pytest.approx(got[names[0]] ** len(names), rel=1e-9)
        assert all(got[a] > got[b] for a, b in zip(names, names[1:]))  # strictly decreasing with depth


def _dense(shapes, density):
    return [n for n, v in layer_densities(shapes, density, "erk").items() if v == 1.0]


def test_erk_dense_layers_golden_resnet18():
    shapes = resnet18_shapes()
    assert _dense(shapes, 0.01) == ["classifier.weight"]
    assert _dense(shapes, 0.05) == ["conv1.weight", "layer2.0.shortcut.0.weight", "classifier.weight"]
    layer1 = [n for n in shapes if n.startswith("layer1.")]
    shortcuts = [n for n in shapes if "shortcut" in n]
    assert set(_dense(shapes, 0.2)) == {"conv1.weight", "classifier.weight", *layer1, *shortcuts}


def test_erk_dense_layers_golden_vgg16():
    shapes = vgg16_shapes()
    assert _dense(shapes, 0.01) == ["classifier.weight"]
    assert _dense(shapes, 0.05) == ["feature.0.weight", "classifier.weight"]
    assert _dense(shapes, 0.2) == ["feature.0.weight", "feature.3.weight", "classifier.weight"]


def test_erk_dense_layers_golden_resnet50():
    shapes = resnet50_shapes()
    assert _dense(shapes, 0.01) == []
    assert _dense(shapes, 0.05) == []
    dense = _dense(shapes, 0.2)
    layer1 = [n for n in shapes if n.startswith("layer1.")]
    assert "conv1.weight" in dense
    assert "layer2.0.conv1.weight" in dense
    assert sum(n in dense for n in layer1) > len(layer1) / 2  # "most of layer1": every 1x1 conv there
    assert [n for n in layer1 if n not in dense] == [f"layer1.{b}.conv2.weight" for b in range(3)]
    assert len(dense) == 9


# --------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [0, 0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1", None])
def test_bad_density(bad):
    with pytest.raises(ValueError, match=r"density must be a finite number in \(0, 1\]"):
        layer_densities(TWO, bad, "erk")


def test_unknown_method_lists_valid():
    with pytest.raises(
        ValueError, match="unknown density method 'foo'; valid: uniform, er, erk, balanced"
    ) as info:
        layer_densities(TWO, 0.1, "foo")
    for name in DENSITY_METHODS:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown density method 'ERK'"):  # case matters, nothing is guessed
        layer_densities(TWO, 0.1, "ERK")


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        ({}, "shapes is empty"),
        ({"a": ()}, "at least 1 dimension"),
        ({"a": (3, 0)}, "positive ints"),
        ({"a": (3, -1)}, "positive ints"),
        ({"a": (2.5, 3)}, "positive ints"),
        ({"a": 7}, "sequence of positive ints"),
    ],
)
def test_bad_shapes(shapes, match):
    with pytest.raises(ValueError, match=match):
        layer_densities(shapes, 0.1, "uniform")


def test_shapes_must_be_mapping():
    with pytest.raises(TypeError, match="mapping"):
        layer_densities([(3, 3)], 0.1, "uniform")


def test_custom_errors():
    with pytest.raises(ValueError, match="needs the custom mapping"):
        layer_densities(TWO, 0.1, "custom")
    with pytest.raises(ValueError, match=r"missing: \['b'\], extra \(unknown\): \['c'\]"):
        layer_densities(TWO, 0.1, "custom", custom={"a": 0.5, "c": 0.5})
    for bad in (1.5, -0.1, float("nan"), "0.5"):
        with pytest.raises(ValueError, match=r"custom density of 'b' must be a finite number in \[0, 1\]"):
            layer_densities(TWO, 0.1, "custom", custom={"a": 0.5, "b": bad})
    with pytest.raises(ValueError, match="only used with method='custom'"):
        layer_densities(TWO, 0.1, "erk", custom={"a": 0.5, "b": 0.5})
    # 0 and 1 are allowed per layer.
    assert layer_densities(TWO, 0.1, "custom", custom={"a": 0, "b": 1}) == {"a": 0.0, "b": 1.0}


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1"])
def test_bad_power_scale(bad):
    with pytest.raises(ValueError, match="power_scale must be a finite number >= 0"):
        layer_densities(TWO, 0.1, "erk", power_scale=bad)


def test_infeasible_scores_raise():
    # Scores underflow to 0 with an absurd exponent: nothing to normalise.
    with pytest.raises(ValueError, match="infeasible"):
        layer_densities({"a": (1000, 1000)}, 0.1, "erk", power_scale=1000.0)
    with pytest.raises(ValueError, match="infeasible.*overflows"):  # (1+1)/1 = 2, 2**5000 overflows a float
        layer_densities({"a": (1, 1), "b": (10, 10)}, 0.1, "erk", power_scale=5000.0)


def test_expected_density_key_mismatch():
    with pytest.raises(ValueError, match=r"missing: \['b'\], extra: \['z'\]"):
        expected_density(TWO, {"a": 0.1, "z": 0.2})
