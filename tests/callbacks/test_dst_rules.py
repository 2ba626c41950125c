"""The DST rules themselves, pinned through the callbacks in real fits on hand-made tensors.

Every test builds a model whose weights, masks and gradients are chosen by hand: the loss is ``Σ_l <W_l, G_l>``
with ``G_l`` read from the batch, so ``dL/dW_l = G_l`` exactly at every step, and SGD runs with ``lr=0`` so the
weights keep their hand-set values. The expected masks are written out position by position (or derived from the
documented random generator for SET), so that a change to a rule (drop by another score, grow by ``|W|``, keep the
smallest weights, ...) fails a test.
"""

from __future__ import annotations

import math

import pytest
import pytorch_lightning as pl
import torch
from conftest import make_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from er_lightning.callbacks.dynamic import GMP, SET, DynamicSparsity, GraNet, RigL
from er_lightning.sparsity.sampling import layer_generator
from er_lightning.sparsity.schedules import ConstantDrop, CosineDrop

A, B = "a.weight", "b.weight"


class HandModule(pl.LightningModule):
    """Two bias-free linear layers ``a`` (4×6) and ``b`` (2×5); loss = <W_a, G_a> + <W_b, G_b> for the batch's G."""

    def __init__(self, weights: dict[str, torch.Tensor], lr: float = 0.0) -> None:
        super().__init__()
        self.a = nn.Linear(6, 4, bias=False)
        self.b = nn.Linear(5, 2, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(weights[A])
            self.b.weight.copy_(weights[B])
        self.lr = lr

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        g_a, g_b = batch
        return (self.a.weight * g_a[0]).sum() + (self.b.weight * g_b[0]).sum()

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def hand_masks(cls: type[DynamicSparsity], masks: dict[str, torch.Tensor]) -> type[DynamicSparsity]:
    """``cls`` with its initial masks replaced by ``masks`` (through the documented ``compute_masks`` hook)."""

    class Hand(cls):  # type: ignore[misc, valid-type]
        def compute_masks(self, trainer, pl_module, shapes):  # noqa: ANN001, ANN201
            return (
                {n: float(m.float().mean()) for n, m in masks.items()},
                {n: m.clone() for n, m in masks.items()},
            )

    Hand.__name__ = cls.__name__
    return Hand


def flat_mask(shape: tuple[int, ...], on: list[int]) -> torch.Tensor:
    m = torch.zeros(math.prod(shape), dtype=torch.bool)
    m[on] = True
    return m.view(shape)


def flat_values(shape: tuple[int, ...], values: dict[int, float], default: float = 0.0) -> torch.Tensor:
    t = torch.full((math.prod(shape),), default)
    for i, v in values.items():
        t[i] = v
    return t.view(shape)


def on(mask: torch.Tensor) -> list[int]:
    return mask.reshape(-1).nonzero().view(-1).tolist()


def fit(cb, weights, grads_a, grads_b, lr: float = 0.0, tmp_path=None):  # noqa: ANN001, ANN201
    """One step per entry of ``grads_a``/``grads_b`` (the step-t gradient of each layer)."""
    module = HandModule(weights, lr=lr)
    data = TensorDataset(torch.stack(grads_a), torch.stack(grads_b))
    trainer = make_trainer(tmp_path, [cb], max_steps=len(grads_a))
    trainer.fit(module, DataLoader(data, batch_size=1, shuffle=False))
    return module, trainer


SA, SB = (4, 6), (2, 5)
# layer a: 8 active weights with distinct magnitudes; layer b: 4 active
MASK_A = flat_mask(SA, [0, 3, 5, 8, 10, 14, 19, 23])
W_A = flat_values(SA, {0: 0.9, 3: -0.1, 5: 0.5, 8: 0.05, 10: -0.7, 14: 0.3, 19: -0.02, 23: 0.6})
MASK_B = flat_mask(SB, [0, 2, 6, 9])
W_B = flat_values(SB, {0: 0.4, 2: -0.8, 6: 0.03, 9: 0.2})
# gradients: on active weights |g| ranks opposite to |W| (the smallest weights have the largest gradients), and the
# largest |g| among inactive positions is not at their lowest indices (growth by |W| there would pick 1, 2)
G_A = flat_values(
    SA, {19: 5.0, 8: 4.0, 3: 0.9, 14: 0.8, 5: 0.4, 23: 0.3, 10: 0.2, 0: 0.1, 21: -3.0, 13: 2.5, 2: 0.5}, 0.01
)
G_B = flat_values(SB, {6: 6.0, 9: 0.5, 0: 0.2, 2: 0.1, 7: -2.0, 1: 0.3}, 0.02)


def rigl(**kwargs) -> RigL:  # noqa: ANN003
    cls = hand_masks(RigL, {A: MASK_A, B: MASK_B})
    defaults = dict(density=0.3, update_every_steps=2, drop_fraction=ConstantDrop(0.25), stop_updates_at=1.0)
    defaults.update(kwargs)
    return cls(**defaults)


def test_rigl_drops_smallest_weight_and_grows_largest_gradient(tmp_path):
    cb = rigl()
    fit(cb, {A: W_A, B: W_B}, [G_A] * 3, [G_B] * 3, tmp_path=tmp_path)  # one update, before step 3
    up = cb.last_update
    assert up is not None and up.step == 2
    # ⌈0.25·8⌉ = 2 dropped in a, ⌈0.25·4⌉ = 1 in b: the smallest |W| (0.02 at 19 and 0.05 at 8; 0.03 at 6), although
    # their gradients are the largest
    assert on(up.dropped[A]) == [8, 19] and on(up.dropped[B]) == [6]
    # grown: the largest |g| among inactive positions that were not just dropped (-3.0 at 21, 2.5 at 13; -2.0 at 7)
    assert on(up.grown[A]) == [13, 21] and on(up.grown[B]) == [7]
    assert on(cb.masked.masks[A]) == [0, 3, 5, 10, 13, 14, 21, 23]
    assert on(cb.masked.masks[B]) == [0, 2, 7, 9]


def test_rigl_with_regrowth_of_dropped_weights_brings_them_back_at_zero(tmp_path):
    cb = rigl(allow_regrow_dropped=True)
    module, _ = fit(cb, {A: W_A, B: W_B}, [G_A] * 3, [G_B] * 3, tmp_path=tmp_path)
    up = cb.last_update
    # the dropped 8 and 19 have the largest |g| of all candidates: they come back, restarted from 0
    assert on(up.grown[A]) == on(up.dropped[A]) == [8, 19]
    assert on(up.grown[B]) == on(up.dropped[B]) == [6]
    assert torch.equal(cb.masked.masks[A], MASK_A) and torch.equal(cb.masked.masks[B], MASK_B)
    w = module.a.weight.detach().reshape(-1)
    assert w[8] == 0 and w[19] == 0 and w[0] == pytest.approx(0.9)


def test_set_grows_where_its_generator_says(tmp_path):
    cls = hand_masks(SET, {A: MASK_A, B: MASK_B})
    cb = cls(
        density=0.3, update_every_steps=2, drop_fraction=ConstantDrop(0.25), stop_updates_at=1.0, seed=11
    )
    fit(cb, {A: W_A, B: W_B}, [G_A] * 3, [G_B] * 3, tmp_path=tmp_path)
    up = cb.last_update
    assert on(up.dropped[A]) == [8, 19] and on(up.dropped[B]) == [6]  # the drop is magnitude, as RigL's
    for index, (name, mask, n) in enumerate([(A, MASK_A, 2), (B, MASK_B, 1)]):
        # the documented stream: uniform numbers from layer_generator(seed, layer index, step); the n largest among
        # the positions that were inactive before the update win
        scores = torch.rand(mask.shape, generator=layer_generator(11, index, 2)).reshape(-1)
        eligible = (~mask).reshape(-1).nonzero().view(-1).tolist()
        expected = sorted(sorted(eligible, key=lambda i: -float(scores[i]))[:n])
        assert on(up.grown[name]) == expected, name


def test_rigl_paper_decay_reaches_zero_at_the_stop(tmp_path):
    # 12 steps, updates every 2 steps, stop at 0.75 · 12 = step 9: updates at 2, 4, 6, 8
    cb = rigl(drop_fraction=CosineDrop(0.3, floor=0.0, until="stop"), stop_updates_at=0.75)
    fractions = []
    original = cb._update

    def spy(trainer, pl_module, step, pruning, regrow):  # noqa: ANN001, ANN202
        original(trainer, pl_module, step, pruning, regrow)
        fractions.append((step, cb.last_update.drop_fraction))

    cb._update = spy  # type: ignore[method-assign]
    fit(cb, {A: W_A, B: W_B}, [G_A] * 12, [G_B] * 12, tmp_path=tmp_path)
    assert [s for s, _ in fractions] == [2, 4, 6, 8]
    for step, f in fractions:  # α/2·(1 + cos(π t / T_end)), T_end = 9
        assert f == pytest.approx(0.15 * (1 + math.cos(math.pi * step / 9)), abs=1e-12)
    # upstream's default decays over the whole run instead: 0.005 + 0.295·(1 + cos(π·8/12))/2 at step 8
    assert CosineDrop(0.3)(8, 12) == pytest.approx(0.07875)
    assert fractions[-1][1] == pytest.approx(0.15 * (1 + math.cos(8 * math.pi / 9)))  # 0.0090, near 0


def test_gradual_pruning_keeps_exactly_the_global_top_magnitudes(tmp_path):
    # dense start; 3 steps, an update every 2 steps: the window is the single update at step 2, which applies the
    # final density exactly: keep round(0.5 · 34) = 17 of the 34 weights
    w_a = torch.arange(1, 25, dtype=torch.float32).view(SA) / 100  # 0.01 ... 0.24
    w_a[0, 0] = -0.5  # one large weight in a, at its lowest index
    w_b = -(torch.arange(10, 20, dtype=torch.float32).view(SB) / 10)  # -1.0 ... -1.9: all larger than a's
    cb = GMP(init_density=1.0, final_density=0.5, update_every_steps=2)
    fit(cb, {A: w_a, B: w_b}, [G_A] * 3, [G_B] * 3, tmp_path=tmp_path)
    assert cb.last_update.target_density == 0.5
    # global top-17 |W|: all 10 of b, then -0.5 at a[0] and a's six largest (0.19 ... 0.24 at 18..23)
    assert on(cb.masked.masks[B]) == list(range(10))
    assert on(cb.masked.masks[A]) == [0, 18, 19, 20, 21, 22, 23]


def _granet(allow: bool) -> GraNet:
    # 12 active weights in a; the update at step 2 prunes to round((8/24)·24) = 8 (removing 4), then drops
    # ⌈0.25·8⌉ = 2 of the 8 and grows 2
    mask_a = flat_mask(SA, list(range(12)))
    cls = hand_masks(GraNet, {A: mask_a, B: torch.ones(SB, dtype=torch.bool)})
    return cls(
        init_density=22 / 34,
        final_density=18 / 34,
        update_every_steps=2,
        drop_fraction=ConstantDrop(0.25),
        allow_regrow_dropped=allow,
    )


def _granet_fit(allow: bool, tmp_path):  # noqa: ANN001, ANN202
    # a's weights 0.01·(i+1) on 0..11; b's ten weights are the largest (1.0 ... 1.9), so global pruning from
    # 22 to 18 weights removes a's four smallest: 0, 1, 2, 3
    w_a = flat_values(SA, {i: 0.01 * (i + 1) for i in range(12)})
    w_b = 1.0 + torch.arange(10, dtype=torch.float32).view(SB) / 10
    # the largest inactive gradient is at 1 (pruned in this update), then 20, 15 (never active)
    g_a = flat_values(SA, {1: 9.0, 20: 5.0, 15: 4.0}, 0.01)
    g_b = torch.zeros(SB)
    cb = _granet(allow)
    fit(cb, {A: w_a, B: w_b}, [g_a] * 3, [g_b] * 3, tmp_path=tmp_path)
    return cb


def test_granet_never_regrows_what_it_pruned_unless_allowed(tmp_path):
    cb = _granet_fit(False, tmp_path / "off")
    up = cb.last_update
    assert up.target_density == pytest.approx(18 / 34)
    # pruned 0..3; dropped the two smallest left (4, 5; b keeps all: ⌈0.25·10⌉ = 3 would go, but b has no free
    # position to grow into, so none does); grown: top |g| among never-active positions
    assert on(up.dropped[A]) == [0, 1, 2, 3, 4, 5]
    assert on(up.grown[A]) == [15, 20]
    assert on(cb.masked.masks[A]) == [6, 7, 8, 9, 10, 11, 15, 20]

    cb = _granet_fit(True, tmp_path / "on")
    up = cb.last_update
    # upstream: the weight pruned at 1 has the largest gradient and is regrown at once, at 0
    assert on(up.grown[A]) == [1, 20]
    assert on(up.dropped[A]) == [0, 1, 2, 3, 4, 5]
    assert on(cb.masked.masks[A]) == [1, 6, 7, 8, 9, 10, 11, 20]
    assert sum(int(m.sum()) for m in cb.masked.masks.values()) == 18


def test_momentum_growth_follows_the_dense_gradient_momentum_not_the_gradient(tmp_path):
    # one active weight dropped per layer-a update (⌈0.25·4⌉ = 1); update at step 3 (before optimizer step 4)
    mask_a = flat_mask(SA, [0, 1, 2, 3])
    w_a = flat_values(SA, {0: 0.4, 1: 0.3, 2: 0.2, 3: 0.1})
    early = flat_values(SA, {17: 10.0})  # steps 0-2: a large gradient at 17
    late = flat_values(SA, {9: 3.0})  # step 3: a smaller one at 9, 17's is 0
    grads_a = [early, early, early, late]
    grads_b = [torch.zeros(SB)] * 4

    def run(growth: str, path):  # noqa: ANN001, ANN202
        cls = hand_masks(RigL, {A: mask_a, B: torch.ones(SB, dtype=torch.bool)})
        cb = cls(
            density=0.3,
            update_every_steps=3,
            drop_fraction=ConstantDrop(0.25),
            stop_updates_at=1.0,
            growth=growth,
            growth_momentum=0.9,
        )
        fit(cb, {A: w_a, B: torch.ones(SB)}, grads_a, grads_b, tmp_path=path)
        return cb

    cb = run("momentum", tmp_path / "m")
    # m = 0.1·(0.9³·g0 + 0.9²·g1 + 0.9·g2 + g3) after the four steps: 2.439 at 17, 0.3 at 9
    expected = 0.1 * (0.9**3 * early + 0.9**2 * early + 0.9 * early + late)
    torch.testing.assert_close(cb.grad_momentum[A], expected)
    assert cb.grad_momentum[A].reshape(-1)[17] == pytest.approx(2.439)
    assert on(cb.last_update.dropped[A]) == [3]
    assert on(cb.last_update.grown[A]) == [17]
    # RigL's gradient growth sees only this step's gradient: 9
    assert on(run("gradient", tmp_path / "g").last_update.grown[A]) == [9]


G2_A = flat_values(SA, {1: 4.0, 7: 3.0, 16: 2.0}, 0.01)
G2_B = flat_values(SB, {4: 1.0, 6: 0.9}, 0.01)


class MetricsProbe(pl.Callback):
    """Placed after the DST callback: reads trainer.callback_metrics at the end of every training batch."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001, ANN201
        self.seen[batch_idx] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("dst/")
        }


def test_update_scalars_equal_hand_counts_on_a_known_mask_sequence(tmp_path):
    from pytorch_lightning.loggers import CSVLogger

    # updates at steps 2 (gradients G) and 4 (G2); ⌈0.375·8⌉ = 3 replaced in a, ⌈0.375·4⌉ = 2 in b
    cb = rigl(drop_fraction=ConstantDrop(0.375))
    probe = MetricsProbe()
    module = HandModule({A: W_A, B: W_B})
    grads_a, grads_b = [G_A, G_A, G_A, G2_A, G2_A], [G_B, G_B, G_B, G2_B, G2_B]
    logger = CSVLogger(str(tmp_path), name="csv")
    trainer = make_trainer(tmp_path, [cb, probe], max_steps=5, logger=logger)  # log_every_n_steps stays 50
    trainer.fit(module, DataLoader(TensorDataset(torch.stack(grads_a), torch.stack(grads_b)), batch_size=1))
    # the hand-worked sequence:
    # update 1: a drops 19, 8, 3 (|W| 0.02, 0.05, 0.1), grows 21, 13, 2; b drops 6, 9, grows 7, 1
    # update 2: a drops its three zeros 2, 13, 21 (regrown at 0, lr = 0), grows 1, 7, 16; b drops 1, 7, grows 4, 6
    assert on(cb.masked.masks[A]) == [0, 1, 5, 7, 10, 14, 16, 23]
    assert on(cb.masked.masks[B]) == [0, 2, 4, 6]
    # overlap with the initial mask {0,3,5,8,10,14,19,23} ∪ {0,2,6,9}: 5 + 2 of 12, then 5 + 3 of 12;
    # ever active: 8 + 3 and 4 + 2 = 17, then 11 + 3 and 6 + 1 = 21, of 34 weights; 5 of 12 replaced each time
    expected = {
        2: {"dst/initial_overlap": 7 / 12, "dst/itop_rate": 17 / 34, "dst/dropped": 5.0, "dst/grown": 5.0},
        4: {"dst/initial_overlap": 8 / 12, "dst/itop_rate": 21 / 34, "dst/dropped": 5.0, "dst/grown": 5.0},
    }
    for step, values in expected.items():
        values.update({"dst/drop_fraction": 5 / 12, "dst/drop_fraction_scheduled": 0.375})
        # callback_metrics hold the update's values at the end of its batch (what ModelCheckpoint/EarlyStopping read)
        assert probe.seen[step] == pytest.approx(values), step
    assert probe.seen[3] == pytest.approx(probe.seen[2])  # until the next update
    # every logger gets both updates at their steps, although no step of this run is a log_every_n_steps step
    import csv

    with open(f"{logger.log_dir}/metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("dst/itop_rate")]
    assert [int(r["step"]) for r in rows] == [2, 4]
    for row, step in zip(rows, (2, 4)):
        for key, value in expected[step].items():
            assert float(row[key]) == pytest.approx(value), (step, key)
        assert float(row["sparsity/density_global"]) == pytest.approx(12 / 34)


def test_realised_drop_fraction_counts_what_a_dense_layer_cannot_replace(tmp_path):
    # b is dense: no free position, so it replaces nothing; a replaces ⌈0.5·8⌉ = 4 of its 8
    cls = hand_masks(RigL, {A: MASK_A, B: torch.ones(SB, dtype=torch.bool)})
    cb = cls(density=0.3, update_every_steps=2, drop_fraction=ConstantDrop(0.5), stop_updates_at=1.0)
    probe = MetricsProbe()
    module = HandModule({A: W_A, B: torch.ones(SB)})
    data = TensorDataset(torch.stack([G_A] * 3), torch.stack([G_B] * 3))
    make_trainer(tmp_path, [cb, probe], max_steps=3).fit(module, DataLoader(data, batch_size=1))
    assert probe.seen[2]["dst/drop_fraction_scheduled"] == 0.5
    assert probe.seen[2]["dst/drop_fraction"] == pytest.approx(4 / 18)
    assert probe.seen[2]["dst/grown"] == 4.0
