"""Seeded mask sampling: exact counts, reproducibility independent of the global RNG, validation."""

from __future__ import annotations

import pytest
import torch
from shapes import resnet18_shapes, vgg16_shapes

from er_lightning.sparsity.distributions import layer_densities
from er_lightning.sparsity.sampling import layer_generator, resample_like, sample_mask, sample_masks
from er_lightning.sparsity.topk import exact_count

_M64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:  # independent reference, checked against the published test vector below
    z = (x + 0x9E3779B97F4A7C15) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def test_generator_seed_is_the_documented_mixing():
    assert _splitmix64(0) == 0xE220A8397B1DCDAF  # first output of SplitMix64 seeded with 0
    for seed, index, step in [(0, 0, 0), (1, 2, 3), (42, 20, 1000), (-1, 5, 7), (2**64 - 1, 0, 1)]:
        expected = _splitmix64(_splitmix64(_splitmix64(seed & _M64) ^ step) ^ index)
        assert layer_generator(seed, index, step).initial_seed() == expected
    # Pinned: changing the mixing would silently change every mask of every saved experiment.
    assert layer_generator(0, 0, 0).initial_seed() == 2558736989570252433
    assert layer_generator(1, 2, 3).initial_seed() == 10321919645218037433


def test_generator_arguments_are_not_interchangeable():
    seeds = {
        layer_generator(s, i, t).initial_seed() for s, i, t in [(1, 2, 3), (1, 3, 2), (2, 1, 3), (3, 2, 1)]
    }
    assert len(seeds) == 4
    assert layer_generator(7, 0).device.type == "cpu"


def test_exact_counts_per_layer():
    shapes = resnet18_shapes()
    densities = layer_densities(shapes, 0.05, "erk")
    masks = sample_masks(shapes, densities, seed=0)
    assert list(masks) == list(shapes)
    for name, shape in shapes.items():
        mask = masks[name]
        assert mask.dtype == torch.bool
        assert mask.device.type == "cpu"
        assert tuple(mask.shape) == tuple(shape)
        assert (
            int(mask.sum())
            == exact_count(densities[name], mask.numel())
            == round(densities[name] * mask.numel())
        )


@pytest.mark.parametrize(
    ("density", "numel", "kept"), [(0.0, 10, 0), (1.0, 10, 10), (0.25, 10, 2), (0.35, 10, 4)]
)
def test_exact_edge_counts(density, numel, kept):
    mask = sample_mask((numel,), density, generator=layer_generator(0, 0))
    assert int(mask.sum()) == kept


def test_same_seed_same_masks_whatever_the_global_rng():
    shapes = dict(list(vgg16_shapes().items())[:7])  # the first 7 convs keep the test fast (1.7M weights)
    densities = layer_densities(shapes, 0.05, "erk")
    first = sample_masks(shapes, densities, seed=3)
    torch.rand(1000)
    torch.manual_seed(123)
    torch.rand(17)
    state = torch.get_rng_state()
    second = sample_masks(shapes, densities, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    for name in shapes:
        assert torch.equal(first[name], second[name]), name
    for sampling in ("exact", "bernoulli"):
        a = sample_mask((64, 64, 3, 3), 0.1, generator=layer_generator(5, 1, 9), sampling=sampling)
        torch.manual_seed(123)
        torch.randn(5)
        b = sample_mask((64, 64, 3, 3), 0.1, generator=layer_generator(5, 1, 9), sampling=sampling)
        assert torch.equal(a, b)


def test_layer_mask_depends_on_its_index_not_on_other_layers():
    first = sample_masks({"a": (50, 40), "b": (30, 20)}, {"a": 0.3, "b": 0.9}, seed=1)
    other_neighbours = sample_masks({"a": (50, 40), "c": (1, 1)}, {"a": 0.3, "c": 1.0}, seed=1)
    assert torch.equal(first["a"], other_neighbours["a"])  # same seed, same index 0
    moved = sample_masks({"b": (30, 20), "a": (50, 40)}, {"a": 0.3, "b": 0.9}, seed=1)
    assert not torch.equal(first["a"], moved["a"])  # index 1 now: a different stream


def test_different_index_step_or_seed_gives_different_masks():
    shape = (64, 64, 3, 3)
    base = sample_mask(shape, 0.1, generator=layer_generator(0, 0, 0))
    for seed, index, step in [(0, 1, 0), (0, 0, 1), (1, 0, 0)]:
        other = sample_mask(shape, 0.1, generator=layer_generator(seed, index, step))
        assert int(other.sum()) == int(base.sum())
        overlap = int((other & base).sum()) / int(base.sum())
        assert overlap < 0.2  # independent draws overlap ~ density (0.1), identical ones 1.0
    masks = sample_masks({"x": shape}, {"x": 0.1}, seed=0, step=5)
    assert not torch.equal(masks["x"], base)
    assert torch.equal(masks["x"], sample_mask(shape, 0.1, generator=layer_generator(0, 0, 5)))


def test_bernoulli_mean_close_to_density():
    for density in (0.01, 0.1, 0.5):
        mask = sample_mask((1000, 1000), density, generator=layer_generator(0, 0), sampling="bernoulli")
        assert mask.dtype == torch.bool
        # std of the mean is sqrt(p(1-p)/1e6) <= 5e-4; allow 6 sigma.
        assert abs(mask.float().mean().item() - density) < 3e-3
    counts = {
        int(sample_mask((100, 100), 0.3, generator=layer_generator(0, i), sampling="bernoulli").sum())
        for i in range(5)
    }
    assert len(counts) > 1  # Binomial, not exact


def test_resample_like_keeps_count_changes_positions():
    mask = sample_mask((256, 128, 3, 3), 0.05, generator=layer_generator(0, 0))
    shuffled = resample_like(mask, generator=layer_generator(0, 0, 1))
    assert shuffled.dtype == torch.bool
    assert shuffled.shape == mask.shape
    assert int(shuffled.sum()) == int(mask.sum())
    assert int((shuffled & mask).sum()) / int(mask.sum()) < 0.15  # ~0.05 expected for fresh positions
    again = resample_like(mask, generator=layer_generator(0, 0, 1))
    assert torch.equal(shuffled, again)
    as_float = resample_like(mask.float(), generator=layer_generator(0, 0, 2))
    assert int(as_float.sum()) == int(mask.sum())


# --------------------------------------------------------------------------------------------- errors


def test_unknown_sampling():
    with pytest.raises(ValueError, match="unknown sampling 'binomial'; valid: exact, bernoulli"):
        sample_mask((3, 3), 0.5, generator=layer_generator(0, 0), sampling="binomial")
    with pytest.raises(ValueError, match="unknown sampling 'Exact'"):
        sample_masks({"a": (3, 3)}, {"a": 0.5}, seed=0, sampling="Exact")


@pytest.mark.parametrize("bad", [-0.1, 1.5, float("nan"), True, "0.5"])
def test_bad_densities(bad):
    with pytest.raises(ValueError, match=r"density of the mask must be a finite number in \[0, 1\]"):
        sample_mask((3, 3), bad, generator=layer_generator(0, 0))
    with pytest.raises(ValueError, match=r"density of 'a' must be a finite number in \[0, 1\]"):
        sample_masks({"a": (3, 3)}, {"a": bad}, seed=0)


def test_keys_mismatch():
    with pytest.raises(ValueError, match=r"missing: \['b'\], extra \(unknown\): \['c'\]"):
        sample_masks({"a": (3, 3), "b": (2,)}, {"a": 0.5, "c": 0.5}, seed=0)


def test_bad_shape():
    with pytest.raises(ValueError, match="shape of the mask must be a sequence of ints"):
        sample_mask((3, -1), 0.5, generator=layer_generator(0, 0))
    with pytest.raises(ValueError, match="shape of 'a' must be a sequence of ints"):
        sample_masks({"a": 3}, {"a": 0.5}, seed=0)


def test_bad_generator():
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        sample_mask((3, 3), 0.5, generator=0)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        resample_like(torch.ones(3, dtype=torch.bool), generator=None)
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        resample_like([1, 0], generator=layer_generator(0, 0))


def test_bad_generator_arguments():
    with pytest.raises(ValueError, match="layer_index must be >= 0, got -1"):
        layer_generator(0, -1)
    with pytest.raises(ValueError, match="step must be >= 0, got -2"):
        layer_generator(0, 0, -2)
    with pytest.raises(ValueError, match="step must be >= 0"):
        sample_masks({"a": (3,)}, {"a": 0.5}, seed=0, step=-1)
    with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\)"):
        layer_generator(2**64, 0)
    with pytest.raises(TypeError, match="seed must be an int"):
        layer_generator(True, 0)
    with pytest.raises(TypeError, match="seed must be an int"):
        sample_masks({"a": (3,)}, {"a": 0.5}, seed=1.5)
