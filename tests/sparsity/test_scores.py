from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from er_lightning.sparsity.scores import (
    SCORE_CRITERIA,
    compute_scores,
    grasp_scores,
    magnitude_scores,
    prune_at_init,
    random_scores,
    score_masks,
    snip_scores,
    synflow_masks,
    synflow_scores,
)
from er_lightning.sparsity.topk import exact_count

# --------------------------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------------------------


def _linear_net(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(4, 6, bias=False),
        nn.ReLU(),
        nn.Linear(6, 5, bias=False),
        nn.ReLU(),
        nn.Linear(5, 3, bias=False),
    ).to(dtype)


LINEAR_NAMES = ["0.weight", "2.weight", "4.weight"]


def _tanh_net(seed: int = 1, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(dtype)


TANH_NAMES = ["0.weight", "2.weight"]


class TinyConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.relu(self.bn(self.conv(x))))
        return self.fc(x.flatten(1))


CONV_NAMES = ["conv.weight", "fc.weight"]
CONV_SHAPE = (2, 4, 4)


def _conv_net() -> TinyConvNet:
    torch.manual_seed(3)
    net = TinyConvNet()
    with torch.no_grad():  # non-trivial BN statistics and affine, some negative
        net.bn.running_mean.copy_(torch.tensor([0.5, -0.3, 0.2, -1.0]))
        net.bn.running_var.copy_(torch.tensor([2.0, 0.5, 1.5, 0.8]))
        net.bn.num_batches_tracked.fill_(7)
        net.bn.weight.copy_(torch.tensor([1.2, -0.7, 0.9, 1.1]))
        net.bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, -0.4]))
    net.train()
    return net


def _conv_batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(11)
    return [
        (torch.randn(5, *CONV_SHAPE, generator=gen), torch.randint(0, 3, (5,), generator=gen))
        for _ in range(n)
    ]


def _batches(in_features: int, classes: int, n: int, dtype: torch.dtype = torch.float64):
    gen = torch.Generator().manual_seed(5)
    return [
        (
            torch.randn(6, in_features, generator=gen, dtype=dtype),
            torch.randint(0, classes, (6,), generator=gen),
        )
        for _ in range(n)
    ]


# --------------------------------------------------------------------------------------------------------------
# Scores against hand computations
# --------------------------------------------------------------------------------------------------------------


def test_magnitude_equals_abs_weight() -> None:
    net = _linear_net()
    scores = magnitude_scores(net, LINEAR_NAMES)
    assert list(scores) == LINEAR_NAMES
    for n, p in net.named_parameters():
        assert scores[n].dtype == torch.float32
        assert torch.equal(scores[n], p.detach().abs())


def test_magnitude_masked_entries_score_zero() -> None:
    net = _linear_net()
    mask = torch.rand(6, 4) > 0.5
    scores = magnitude_scores(net, LINEAR_NAMES, masks={"0.weight": mask})
    assert torch.equal(scores["0.weight"], net[0].weight.detach().abs() * mask)


def test_snip_matches_hand_computation() -> None:
    net = _tanh_net()
    (x, y), (x2, y2) = _batches(3, 2, 2)
    w = [net[0].weight, net[2].weight]
    g = torch.autograd.grad(F.cross_entropy(net(x), y), w)
    expected = {n: (gi * wi).abs().float() for n, gi, wi in zip(TANH_NAMES, g, w)}
    scores = snip_scores(net, TANH_NAMES, [(x, y)])
    for n in TANH_NAMES:
        torch.testing.assert_close(scores[n], expected[n], rtol=1e-6, atol=0)

    # num_batches=2 averages the two batch gradients.
    g2 = torch.autograd.grad(F.cross_entropy(net(x2), y2), w)
    scores2 = snip_scores(net, TANH_NAMES, iter([(x, y), (x2, y2), (x, y)]), num_batches=2)
    for n, a, b, wi in zip(TANH_NAMES, g, g2, w):
        torch.testing.assert_close(scores2[n], ((a + b) / 2 * wi).abs().float(), rtol=1e-6, atol=0)


def test_snip_with_masks_uses_masked_weights() -> None:
    net = _tanh_net()
    [(x, y)] = _batches(3, 2, 1)
    mask = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    ref = copy.deepcopy(net)
    with torch.no_grad():
        ref[0].weight.mul_(mask)
    w = [ref[0].weight, ref[2].weight]
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), w)
    scores = snip_scores(net, TANH_NAMES, [(x, y)], masks={"0.weight": mask})
    for n, gi, wi in zip(TANH_NAMES, g, w):
        torch.testing.assert_close(scores[n], (gi * wi).abs().float(), rtol=1e-6, atol=0)
    assert torch.all(scores["0.weight"][~mask] == 0)


def test_snip_runs_in_eval_mode_on_bn_dropout_net() -> None:
    net = _conv_net()
    batches = _conv_batches(1)
    ref = copy.deepcopy(net).eval()
    w = [ref.conv.weight, ref.fc.weight]
    g = torch.autograd.grad(F.cross_entropy(ref(batches[0][0]), batches[0][1]), w)
    torch.manual_seed(123)
    a = snip_scores(net, CONV_NAMES, batches)
    torch.manual_seed(456)
    b = snip_scores(net, CONV_NAMES, batches)
    for n, gi, wi in zip(CONV_NAMES, g, w):
        torch.testing.assert_close(a[n], (gi * wi).abs(), rtol=1e-5, atol=1e-7)
        assert torch.equal(a[n], b[n])  # no dropout: independent of the global RNG


def test_grasp_matches_independent_hvp() -> None:
    net = _tanh_net()
    batches = _batches(3, 2, 2)
    temperature = 3.0
    base = {n: p.detach() for n, p in net.named_parameters()}
    w0 = tuple(base[n] for n in TANH_NAMES)

    def loss_of(*ws: torch.Tensor) -> torch.Tensor:
        params = dict(base)
        params.update(zip(TANH_NAMES, ws))
        losses = [F.cross_entropy(functional_call(net, params, (x,)) / temperature, y) for x, y in batches]
        return sum(losses) / len(losses)

    g = torch.autograd.functional.jacobian(loss_of, w0)
    _, hg = torch.autograd.functional.hvp(loss_of, w0, tuple(g))
    scores = grasp_scores(net, TANH_NAMES, batches, num_batches=2, temperature=temperature)
    for n, wi, hi in zip(TANH_NAMES, w0, hg):
        expected = (wi * hi).float()  # keep-score = -(paper's -W ⊙ Hg)
        assert expected.abs().max() > 1e-6
        torch.testing.assert_close(scores[n], expected, rtol=1e-5, atol=1e-9)


def test_grasp_masked_entries_score_zero_and_stay_pruned() -> None:
    net = _tanh_net()
    batches = _batches(3, 2, 1)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0] = False
    scores = grasp_scores(net, TANH_NAMES, batches, masks={"0.weight": mask})
    assert torch.all(scores["0.weight"][0] == 0)
    masks = prune_at_init("grasp", net, TANH_NAMES, 0.5, batches=batches, masks={"0.weight": mask})
    assert not masks["0.weight"][0].any()
    assert sum(int(m.sum()) for m in masks.values()) == round(0.5 * 20)


def test_synflow_conservation_per_layer() -> None:
    net = _linear_net()
    scores = synflow_scores(net, LINEAR_NAMES, input_shape=(4,))
    sums = [float(scores[n].double().sum()) for n in LINEAR_NAMES]
    with torch.no_grad():
        x = torch.ones(1, 4)
        for layer in (net[0], net[2], net[4]):
            x = layer.weight.abs() @ x.T
            x = x.T
        r = float(x.sum())
    for s in sums:
        assert s == pytest.approx(r, rel=1e-5)
    assert max(sums) - min(sums) <= 1e-5 * max(sums)


def test_synflow_takes_abs_of_everything_including_bn_running_stats() -> None:
    net = _conv_net()
    ref = copy.deepcopy(net).eval()
    with torch.no_grad():
        for t in ref.state_dict(keep_vars=True).values():
            if t.is_floating_point():
                t.abs_()
    w = [ref.conv.weight, ref.fc.weight]
    g = torch.autograd.grad(ref(torch.ones(1, *CONV_SHAPE)).sum(), w)
    scores = synflow_scores(net, CONV_NAMES, input_shape=CONV_SHAPE)
    for n, gi, wi in zip(CONV_NAMES, g, w):
        torch.testing.assert_close(scores[n], (gi * wi).abs(), rtol=1e-5, atol=0)


def test_synflow_double_returns_float64_close_to_float32() -> None:
    net = _linear_net()
    s32 = synflow_scores(net, LINEAR_NAMES, input_shape=(4,))
    s64 = synflow_scores(net, LINEAR_NAMES, input_shape=(4,), double=True)
    for n in LINEAR_NAMES:
        assert s64[n].dtype == torch.float64
        torch.testing.assert_close(s64[n].float(), s32[n], rtol=1e-5, atol=1e-7)
    assert net[0].weight.dtype == torch.float32


def test_random_scores_seeded_and_independent_of_global_rng() -> None:
    net = _linear_net()
    torch.manual_seed(0)
    a = random_scores(net, LINEAR_NAMES, seed=4)
    after = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after, torch.rand(1))
    torch.manual_seed(99)
    b = random_scores(net, LINEAR_NAMES, seed=4)
    c = random_scores(net, LINEAR_NAMES, seed=5)
    sub = random_scores(net, ["2.weight"], seed=4)
    for n in LINEAR_NAMES:
        assert torch.equal(a[n], b[n])
        assert not torch.equal(a[n], c[n])
        assert a[n].min() >= 0 and a[n].max() < 1
    assert torch.equal(sub["2.weight"], a["2.weight"])  # a layer's scores don't depend on the others


# --------------------------------------------------------------------------------------------------------------
# Exact counts
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("density", [0.013, 0.1, 0.37, 0.5, 0.999, 1.0])
def test_score_masks_exact_counts(density: float) -> None:
    gen = torch.Generator().manual_seed(0)
    scores = {
        "a": torch.rand(7, 11, generator=gen),
        "b": torch.rand(3, 3, 5, generator=gen),
        "c": torch.rand(13),
    }
    total = sum(s.numel() for s in scores.values())
    glob = score_masks(scores, density, scope="global")
    assert sum(int(m.sum()) for m in glob.values()) == round(density * total)
    kept = torch.cat([scores[n][glob[n]] for n in scores])
    dropped = torch.cat([scores[n][~glob[n]] for n in scores])
    if dropped.numel():
        assert kept.min() >= dropped.max()
    layer = score_masks(scores, density, scope="layerwise")
    for n, s in scores.items():
        assert layer[n].dtype == torch.bool and layer[n].shape == s.shape
        assert int(layer[n].sum()) == exact_count(density, s.numel()) == round(density * s.numel())


def test_score_masks_ties_are_deterministic_and_masks_restrict() -> None:
    scores = {"a": torch.ones(2, 3), "b": torch.ones(4)}
    m = score_masks(scores, 0.5)  # 5 of 10, all tied: first five positions in mapping order
    assert m["a"].flatten().tolist() == [True] * 5 + [False] and not m["b"].any()
    only = {"a": torch.tensor([[True, False, True], [False, False, False]])}
    m2 = score_masks(scores, 0.4, masks=only)
    assert torch.equal(m2["a"], only["a"]) and int(m2["b"].sum()) == 2
    with pytest.raises(ValueError, match="cannot regrow"):
        score_masks(scores, 0.5, scope="layerwise", masks=only)


@pytest.mark.parametrize("density", [0.05, 0.3, 0.77])
def test_synflow_masks_exact_total(density: float) -> None:
    net = _linear_net()
    n_total = 4 * 6 + 6 * 5 + 5 * 3
    masks = synflow_masks(net, LINEAR_NAMES, density, input_shape=(4,), rounds=20)
    assert sum(int(m.sum()) for m in masks.values()) == round(density * n_total)
    lw = synflow_masks(net, LINEAR_NAMES, density, input_shape=(4,), rounds=5, scope="layerwise")
    for n, p in net.named_parameters():
        assert int(lw[n].sum()) == round(density * p.numel())


def test_synflow_masks_respect_starting_masks() -> None:
    net = _conv_net()
    start = {"conv.weight": torch.arange(72).reshape(4, 2, 3, 3) % 3 != 0}
    masks = synflow_masks(net, CONV_NAMES, 0.2, input_shape=CONV_SHAPE, rounds=10, masks=start)
    assert not (masks["conv.weight"] & ~start["conv.weight"]).any()
    assert sum(int(m.sum()) for m in masks.values()) == round(0.2 * (72 + 192))


def test_iterative_synflow_one_round_equals_single_shot() -> None:
    net = _conv_net()
    for density in (0.1, 0.45):
        single = score_masks(synflow_scores(net, CONV_NAMES, input_shape=CONV_SHAPE), density)
        iterative = synflow_masks(net, CONV_NAMES, density, input_shape=CONV_SHAPE, rounds=1)
        for n in CONV_NAMES:
            assert torch.equal(single[n], iterative[n])


def test_iterative_synflow_avoids_layer_collapse() -> None:
    # Tanaka et al.'s point: at low density single-shot SynFlow empties the wide layer here (its scores are spread
    # over 800 weights, the classifier's over 80), while 50 rounds keep input-to-output paths.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(20, 40, bias=False), nn.ReLU(), nn.Linear(40, 2, bias=False))
    names = ["0.weight", "2.weight"]

    def paths(m: dict[str, torch.Tensor]) -> int:  # hidden units with a kept input and a kept output
        return int(((m["0.weight"].sum(1) > 0) & (m["2.weight"].sum(0) > 0)).sum())

    single = score_masks(synflow_scores(net, names, input_shape=(20,)), 0.02)
    iterative = synflow_masks(net, names, 0.02, input_shape=(20,), rounds=50)
    assert int(single["0.weight"].sum()) == 0 and paths(single) == 0
    assert paths(iterative) > 0
    assert sum(int(m.sum()) for m in iterative.values()) == round(0.02 * 880)


# --------------------------------------------------------------------------------------------------------------
# Model state discipline
# --------------------------------------------------------------------------------------------------------------


def _snapshot(net: nn.Module) -> dict[str, object]:
    return {
        "state": {k: v.detach().clone() for k, v in net.state_dict().items()},
        "training": {n: m.training for n, m in net.named_modules()},
        "requires_grad": {n: p.requires_grad for n, p in net.named_parameters()},
        "grad": {n: None if p.grad is None else p.grad.clone() for n, p in net.named_parameters()},
    }


def _assert_same(before: dict[str, object], after: dict[str, object]) -> None:
    assert before["training"] == after["training"]
    assert before["requires_grad"] == after["requires_grad"]
    for k, v in before["state"].items():  # type: ignore[union-attr]
        assert torch.equal(v, after["state"][k]), k  # type: ignore[index]
    for k, g in before["grad"].items():  # type: ignore[union-attr]
        g2 = after["grad"][k]  # type: ignore[index]
        assert (g is None) == (g2 is None), k
        if g is not None:
            assert torch.equal(g, g2), k


@pytest.mark.parametrize("criterion", SCORE_CRITERIA)
@pytest.mark.parametrize("masks", [False, True])
def test_model_left_unchanged(criterion: str, masks: bool) -> None:
    net = _conv_net()
    net.fc.weight.grad = torch.full_like(net.fc.weight, 0.25)
    net.bn.weight.requires_grad_(False)
    net.eval()
    net.bn.train()  # mixed flags must come back as they were
    batches = _conv_batches(2)
    mask = {"conv.weight": torch.arange(72).reshape(4, 2, 3, 3) % 2 == 0} if masks else None
    before = _snapshot(net)
    kwargs = {"batches": batches, "num_batches": 2, "input_shape": CONV_SHAPE, "masks": mask}

    torch.manual_seed(0)
    scores = compute_scores(criterion, net, CONV_NAMES, **kwargs)
    masks_out = prune_at_init(criterion, net, CONV_NAMES, 0.3, rounds=3, **kwargs)
    drawn = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(drawn, torch.rand(1)), "scoring consumed the global RNG"

    _assert_same(before, _snapshot(net))
    assert net.fc.weight.grad is not None and net.conv.weight.grad is None
    for n, p in net.named_parameters():
        if n in CONV_NAMES:
            assert scores[n].shape == p.shape and scores[n].device == p.device
            assert masks_out[n].dtype == torch.bool
    assert sum(int(m.sum()) for m in masks_out.values()) == round(0.3 * (72 + 192))


def test_scoring_under_no_grad_still_works() -> None:
    net = _tanh_net()
    batches = _batches(3, 2, 1)
    ref = snip_scores(net, TANH_NAMES, batches)
    with torch.no_grad():
        inside = snip_scores(net, TANH_NAMES, batches)
    for n in TANH_NAMES:
        assert torch.equal(ref[n], inside[n])


# --------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["snip", "grasp"])
def test_data_criteria_need_batches(criterion: str) -> None:
    with pytest.raises(ValueError, match="datamodule or train dataloader"):
        compute_scores(criterion, _tanh_net(), TANH_NAMES)
    with pytest.raises(ValueError, match="batches"):
        prune_at_init(criterion, _tanh_net(), TANH_NAMES, 0.5)


def test_errors() -> None:
    net = _tanh_net()
    batches = _batches(3, 2, 1)
    with pytest.raises(ValueError, match="num_batches"):
        snip_scores(net, TANH_NAMES, batches, num_batches=0)
    with pytest.raises(ValueError, match="yielded only 1"):
        grasp_scores(net, TANH_NAMES, batches, num_batches=2)
    with pytest.raises(ValueError, match="rounds"):
        synflow_masks(net, TANH_NAMES, 0.5, input_shape=(3,), rounds=0)
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="density"):
            prune_at_init("magnitude", net, TANH_NAMES, bad)
        with pytest.raises(ValueError, match="density"):
            score_masks({"a": torch.ones(3)}, bad)
    with pytest.raises(ValueError, match="valid criteria are .*snip.*grasp.*synflow.*magnitude.*random"):
        compute_scores("imp", net, TANH_NAMES)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="input_shape"):
        compute_scores("synflow", net, TANH_NAMES)
    with pytest.raises(ValueError, match="input_shape"):
        prune_at_init("synflow", net, TANH_NAMES, 0.5)
    with pytest.raises(ValueError, match=r"not parameters of the model: \['0.wieght', 'x'\]"):
        magnitude_scores(net, ["0.wieght", "2.weight", "x"])
    with pytest.raises(ValueError, match="scope"):
        score_masks({"a": torch.ones(3)}, 0.5, scope="per-layer")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature"):
        grasp_scores(net, TANH_NAMES, batches, temperature=0.0)
    with pytest.raises(ValueError, match="shape"):
        magnitude_scores(net, TANH_NAMES, masks={"0.weight": torch.ones(3, 4, dtype=torch.bool)})
    with pytest.raises(TypeError, match=r"\[\(inputs, targets\)\]"):
        snip_scores(net, TANH_NAMES, batches[0])
    with pytest.raises(ValueError, match="empty"):
        magnitude_scores(net, [])
