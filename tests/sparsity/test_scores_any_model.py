"""Scores beyond image classifiers: losses of any batch structure, token models in SynFlow, attention in GraSP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from er_lightning.masking import default_targets
from er_lightning.models import TransformerLM
from er_lightning.sparsity.scores import grasp_scores, prune_at_init, snip_scores, synflow_scores


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def _pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(5, 4, generator=g), torch.randint(0, 3, (5,), generator=g)) for _ in range(2)]


def _dict_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(model(batch["image"]), batch["label"])


def test_batch_loss_takes_any_batch_structure_and_equals_loss_fn():
    net = _mlp()
    names = ["0.weight", "2.weight"]
    dicts = [{"image": x, "label": y} for x, y in _pairs()]
    for scorer in (snip_scores, grasp_scores):
        ref = scorer(net, names, _pairs(), num_batches=2)
        got = scorer(net, names, dicts, batch_loss=_dict_loss, num_batches=2)
        for n in names:
            torch.testing.assert_close(got[n], ref[n], rtol=0, atol=0)


def test_grasp_temperature_divides_the_forward_output_or_says_it_cannot():
    net = _mlp()
    names = ["0.weight", "2.weight"]
    dicts = [{"image": x, "label": y} for x, y in _pairs()]
    hot = grasp_scores(net, names, dicts, batch_loss=_dict_loss, temperature=200.0)
    cold = grasp_scores(net, names, dicts, batch_loss=_dict_loss, temperature=1.0)
    assert not torch.allclose(hot["0.weight"], cold["0.weight"])

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = _mlp()

    def inner_only(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return _dict_loss(model.inner, batch)  # never calls the wrapper's forward

    with pytest.raises(ValueError, match="never called Wrapper.forward"):
        grasp_scores(Wrapper(), ["inner.0.weight"], dicts, batch_loss=inner_only)
    with pytest.raises(ValueError, match="scalar floating-point"):
        snip_scores(net, names, dicts, batch_loss=lambda m, b: m(b["image"]))


def _lm() -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM(vocab_size=16, seq_len=6, dim=16, depth=1, heads=2)


def _token_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    logits = model(batch[0])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[1].reshape(-1))


def test_grasp_runs_through_attention():
    lm = _lm()
    names = default_targets(lm, embeddings=True)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(16, (4, 6), generator=g), torch.randint(16, (4, 6), generator=g))]
    scores = grasp_scores(lm, names, batches, batch_loss=_token_loss)  # fused SDPA has no double backward
    assert all(torch.isfinite(s).all() and s.abs().sum() > 0 for s in scores.values())


def test_synflow_of_an_embedding_is_synflow_of_the_equivalent_linear_layer():
    """A lookup is onehot(i) @ E: its all-ones input is 1 @ E, so E scores as the linear layer x -> x @ E does."""
    torch.manual_seed(0)
    emb = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 3, bias=False))
    lin = nn.Sequential(nn.Linear(7, 5, bias=False), nn.Linear(5, 3, bias=False))
    with torch.no_grad():
        lin[0].weight.copy_(emb[0].weight.T)
        lin[1].weight.copy_(emb[1].weight)
    # one position: input (1, 1) token ids against a (1, 7) all-ones vector
    token_scores = synflow_scores(emb, ["0.weight", "1.weight"], input_shape=(1,))
    dense_scores = synflow_scores(lin, ["0.weight", "1.weight"], input_shape=(7,))
    torch.testing.assert_close(token_scores["0.weight"], dense_scores["0.weight"].T)
    torch.testing.assert_close(token_scores["1.weight"], dense_scores["1.weight"])
    # T positions: every position carries the same all-ones signal, so scores scale by T
    four = synflow_scores(emb, ["0.weight"], input_shape=(4,))
    torch.testing.assert_close(four["0.weight"], 4 * token_scores["0.weight"])


def test_synflow_leaves_the_padding_row_out_and_refuses_embedding_bags():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Embedding(6, 4, padding_idx=2), nn.Linear(4, 2))
    scores = synflow_scores(net, ["0.weight"], input_shape=(3,))["0.weight"]
    assert (scores[2] == 0).all() and (scores[[0, 1, 3, 4, 5]] > 0).all()
    with pytest.raises(ValueError, match="nn.EmbeddingBag"):
        synflow_scores(nn.Sequential(nn.EmbeddingBag(6, 4), nn.Linear(4, 2)), ["1.weight"], input_shape=(3,))


def test_synflow_on_a_transformer_lm_keeps_an_exact_count():
    lm = _lm()
    names = default_targets(lm, embeddings=True)
    masks = prune_at_init("synflow", lm, names, 0.1, input_shape=(6,), rounds=5)
    total = sum(dict(lm.named_parameters())[n].numel() for n in names)
    assert sum(int(m.sum()) for m in masks.values()) == round(0.1 * total)


def test_synflow_says_what_it_fed_when_the_model_cannot_take_it():
    lm = _lm()
    with pytest.raises(ValueError, match=r"synflow fed int64 token ids .* of shape \(1, 9\)"):
        synflow_scores(lm, ["token.weight"], input_shape=(9,))  # longer than seq_len=6
