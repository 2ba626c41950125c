"""ER/ERK on transformer shapes: attention projections (packed and separate), embeddings, patch convs.

Hand-worked: for 2-D weights (a, b) ER and ERK both score r = (a + b) / (a·b), so with nothing capped
d_l = d·N·(a_l + b_l) / (a_l·b_l · Σ_k (a_k + b_k)) (Σ r_k·n_k = Σ (a_k + b_k)).
"""

from __future__ import annotations

import pytest

from er_lightning.masking import default_targets
from er_lightning.models import TransformerLM, ViT
from er_lightning.sparsity import expected_density, layer_densities

# One block of the example LM (E = 32, vocabulary 64, 16 positions, MLP 64); the tied head is the token table.
LM_SHAPES = {
    "token.weight": (64, 32),
    "position.weight": (16, 32),
    "blocks.0.attn.in_proj_weight": (96, 32),
    "blocks.0.attn.out_proj.weight": (32, 32),
    "blocks.0.fc1.weight": (64, 32),
    "blocks.0.fc2.weight": (32, 64),
}


def test_the_models_give_these_shapes():
    lm = TransformerLM(vocab_size=64, seq_len=16, dim=32, depth=1, heads=4, mlp_ratio=2)
    params = dict(lm.named_parameters())
    assert {n: tuple(params[n].shape) for n in default_targets(lm, embeddings=True)} == LM_SHAPES


@pytest.mark.parametrize("method", ["er", "erk"])
def test_lm_shapes_hand_worked(method):
    # N = 2048 + 512 + 3072 + 1024 + 2048 + 2048 = 10752, Σ (a + b) = 96 + 48 + 128 + 64 + 96 + 96 = 528
    got = layer_densities(LM_SHAPES, 0.1, method)
    eps = 0.1 * 10752 / 528
    for name, (a, b) in LM_SHAPES.items():
        assert got[name] == pytest.approx(eps * (a + b) / (a * b), rel=1e-12), name
    assert got["token.weight"] == pytest.approx(0.0954545454, rel=1e-9)
    assert got["blocks.0.attn.in_proj_weight"] == pytest.approx(0.0848484848, rel=1e-9)
    assert got["position.weight"] == pytest.approx(0.1909090909, rel=1e-9)
    assert expected_density(LM_SHAPES, got) == pytest.approx(0.1, rel=1e-12)


@pytest.mark.parametrize("method", ["er", "erk"])
def test_packed_in_proj_is_one_layer_of_fan_out_3e(method):
    """Packed (3E × E) scores 4/(3E), a separate (E × E) projection 2/E: the packed one is 2/3 as dense."""
    e = 32
    got = layer_densities({"q": (e, e), "k": (e, e), "v": (e, e), "packed": (3 * e, e)}, 0.1, method)
    # Σ (a + b) = 3·64 + 128 = 320, N = 6144: eps = 0.1·6144/320 = 1.92
    assert got["q"] == got["k"] == got["v"] == pytest.approx(1.92 * 2 / e, rel=1e-12)  # 0.12
    assert got["packed"] == pytest.approx(1.92 * 4 / (3 * e), rel=1e-12)  # 0.08
    assert got["packed"] / got["q"] == pytest.approx(2 / 3, rel=1e-12)


@pytest.mark.parametrize("method", ["er", "erk"])
def test_an_embedding_is_symmetric_in_vocabulary_and_width(method):
    """(V, E) as nn.Embedding stores it or (E, V) transposed: the same density (the score is symmetric)."""
    got = layer_densities({"table": (1000, 16), "proj": (16, 16)}, 0.05, method)
    flipped = layer_densities({"table": (16, 1000), "proj": (16, 16)}, 0.05, method)
    assert got == pytest.approx(flipped, rel=1e-12)
    # N = 16000 + 256; Σ (a + b) = 1016 + 32 = 1048; eps = 0.05·16256/1048
    eps = 0.05 * 16256 / 1048
    assert got["table"] == pytest.approx(eps * 1016 / 16000, rel=1e-12)
    assert got["proj"] == pytest.approx(eps * 32 / 256, rel=1e-12)


def test_a_patch_conv_counts_its_kernel_in_erk_not_in_er():
    vit = ViT(num_classes=10, image_size=8, patch_size=4, in_channels=3, dim=64, depth=1, heads=2)
    params = dict(vit.named_parameters())
    shapes = {n: tuple(params[n].shape) for n in default_targets(vit)}
    assert shapes["patch.weight"] == (64, 3, 4, 4)
    # raw scores: ER (64 + 3)/(64·3); ERK (64 + 3 + 4 + 4)/(64·3·4·4)
    er = layer_densities(shapes, 0.2, "er")
    erk = layer_densities(shapes, 0.2, "erk")
    assert er["patch.weight"] == 1.0  # 67/192 · eps > 1: dense, surplus redistributed
    ratio_erk = erk["patch.weight"] / erk["blocks.0.attn.out_proj.weight"]
    assert ratio_erk == pytest.approx((75 / 3072) / (128 / 4096), rel=1e-12)
    assert expected_density(shapes, er) == pytest.approx(0.2, rel=1e-12)
    assert expected_density(shapes, erk) == pytest.approx(0.2, rel=1e-12)
