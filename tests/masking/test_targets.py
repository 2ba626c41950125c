"""The default target rule on transformers, embeddings, recurrent layers and tied weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from er_lightning.masking import default_targets, select_targets
from er_lightning.masking.masked import count_zeros
from er_lightning.masking.targets import large_dense_parameters, parameter_aliases
from er_lightning.models import TransformerLM


def test_packed_and_separate_attention_projections_are_targets_biases_never():
    packed = nn.MultiheadAttention(16, 2)
    assert default_targets(packed) == ["in_proj_weight", "out_proj.weight"]
    separate = nn.MultiheadAttention(16, 2, kdim=8, vdim=12)
    assert default_targets(separate) == ["q_proj_weight", "k_proj_weight", "v_proj_weight", "out_proj.weight"]
    assert dict(separate.named_parameters())["k_proj_weight"].shape == (16, 8)


def test_linear_in_any_container_and_torch_transformer_layers():
    net = nn.ModuleDict(
        {
            "seq": nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)),
            "lst": nn.ModuleList([nn.ModuleDict({"deep": nn.Linear(4, 2)})]),
            "enc": nn.TransformerEncoderLayer(8, 2, dim_feedforward=16),
        }
    )
    assert default_targets(net) == [
        "seq.0.weight",
        "lst.0.deep.weight",
        "enc.self_attn.in_proj_weight",
        "enc.self_attn.out_proj.weight",
        "enc.linear1.weight",
        "enc.linear2.weight",
    ]


def test_embeddings_only_on_request():
    net = nn.ModuleDict({"emb": nn.Embedding(10, 4), "bag": nn.EmbeddingBag(7, 4), "fc": nn.Linear(4, 3)})
    assert default_targets(net) == ["fc.weight"]
    assert default_targets(net, embeddings=True) == ["emb.weight", "bag.weight", "fc.weight"]
    assert select_targets(net, embeddings=True, exclude=["bag.*"]) == ["emb.weight", "fc.weight"]


def test_convolutions_transposed_bilinear_and_recurrent_weights():
    net = nn.ModuleDict(
        {
            "c1": nn.Conv1d(2, 3, 3),
            "t2": nn.ConvTranspose2d(3, 4, 2),
            "bi": nn.Bilinear(3, 4, 5),
            "lstm": nn.LSTM(4, 6, num_layers=2),
            "bn": nn.BatchNorm1d(3),
        }
    )
    assert default_targets(net) == [
        "c1.weight",
        "t2.weight",
        "bi.weight",
        "lstm.weight_ih_l0",
        "lstm.weight_hh_l0",
        "lstm.weight_ih_l1",
        "lstm.weight_hh_l1",
    ]


def test_tied_head_is_one_target_under_its_first_name():
    lm = TransformerLM(vocab_size=20, seq_len=8, dim=16, depth=1, heads=2)
    assert parameter_aliases(lm) == {"token.weight": ["head.weight"]}
    targets = default_targets(lm)  # embeddings off: the table is still the head's matmul weight
    assert targets.count("token.weight") == 1
    assert "head.weight" not in targets
    assert "position.weight" not in targets
    assert targets == [
        "token.weight",
        "blocks.0.attn.in_proj_weight",
        "blocks.0.attn.out_proj.weight",
        "blocks.0.fc1.weight",
        "blocks.0.fc2.weight",
    ]
    # patterns match a shared tensor by any of its names and give its one name
    assert select_targets(lm, include=["head.weight"]) == ["token.weight"]
    assert "token.weight" not in select_targets(lm, exclude=["head.*"])
    untied = TransformerLM(vocab_size=20, seq_len=8, dim=16, depth=1, heads=2, tie_weights=False)
    assert default_targets(untied)[-1] == "head.weight"
    assert "token.weight" not in default_targets(untied)


def test_uninitialised_lazy_layer_raises():
    with pytest.raises(ValueError, match="uninitialised lazy parameter"):
        default_targets(nn.Sequential(nn.LazyLinear(3)))


def test_large_dense_parameters_lists_bare_parameters_and_embeddings():
    class Custom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(100, 8)  # 800
            self.proj = nn.Parameter(torch.zeros(8, 8))  # 64: 64 / 1004 >= 10 %? no (6.4 %)
            self.fc = nn.Linear(8, 16)  # 128 + 16

    net = Custom()
    total = sum(p.numel() for p in net.parameters())
    assert total == 800 + 64 + 128 + 16
    assert large_dense_parameters(net, default_targets(net)) == {"table.weight": 800}
    assert large_dense_parameters(net, default_targets(net, embeddings=True)) == {}
    assert large_dense_parameters(net, ["table.weight"], share=0.05) == {"proj": 64, "fc.weight": 128}


def test_count_zeros_counts_a_shared_tensor_once():
    lm = TransformerLM(vocab_size=20, seq_len=8, dim=16, depth=1, heads=2)
    with torch.no_grad():
        lm.token.weight[:5].zero_()  # 80 zeros, seen through head.weight too
    zeros, total = count_zeros(lm)
    assert total == sum(p.numel() for p in lm.parameters())
    # LayerNorm and attention biases start at zero: count them by hand over the unique state_dict tensors
    sd = lm.state_dict(keep_vars=True)
    params = {id(p) for p in lm.parameters()}
    unique = {id(t): t for t in sd.values() if id(t) in params}
    assert len(unique) == len(params) < len(sd)
    assert zeros == sum(int((t == 0).sum()) for t in unique.values())
    assert zeros >= 80
