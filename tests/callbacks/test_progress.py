"""Step schedules count in one unit: one optimizer, and under manual optimization one step per batch, or an error."""

from __future__ import annotations

import pytest
import torch
from conftest import PlainModule, make_trainer, random_loader
from torch import nn

from er_lightning.callbacks import SET, GraNet, RigL, SoftThreshold, StaticSparsity, Supermask


class TwoOptimizers(PlainModule):
    """A GAN-like manual loop: two optimizers (conv layers, classifier), both stepped every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()

    def configure_optimizers(self):  # noqa: ANN201
        convs = [p for n, p in self.named_parameters() if not n.startswith("net.fc")]
        return torch.optim.SGD(convs, lr=0.01), torch.optim.SGD(self.net.fc.parameters(), lr=0.01)


class ManualSteps(PlainModule):
    """Manual optimization with one optimizer, stepped ``steps`` times per batch."""

    def __init__(self, steps: int) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.steps = steps

    def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
        x, y = batch
        opt = self.optimizers()
        for _ in range(self.steps):
            opt.zero_grad()
            self.manual_backward(nn.functional.cross_entropy(self(x), y))
            opt.step()


@pytest.mark.parametrize(
    "factory",
    [
        lambda: RigL(density=0.3, update_every_steps=2, stop_updates_at=0.75),
        lambda: GraNet(init_density=0.5, final_density=0.2, update_every_steps=2),
        lambda: Supermask(density=0.2, er_density=0.5, levels=2),
        lambda: SoftThreshold(density=0.5, s_init=-2.5, target_density=0.3),
    ],
    ids=["RigL", "GraNet", "Supermask", "SoftThreshold"],
)
def test_several_optimizers_raise_for_step_schedules(tmp_path, factory):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [factory()], max_steps=8)
    with pytest.raises(RuntimeError, match=r"counts optimizer steps.*this run has 2 optimizers"):
        trainer.fit(TwoOptimizers(), random_loader())


def test_callbacks_without_step_schedules_accept_several_optimizers(tmp_path):
    torch.manual_seed(0)
    module = TwoOptimizers()
    cb = StaticSparsity(density=0.3)
    make_trainer(tmp_path, [cb], max_steps=4).fit(module, random_loader())
    for name, p in module.named_parameters():
        if name in cb.masked.masks:
            assert (p[~cb.masked.masks[name]] == 0).all()
    torch.manual_seed(0)
    sm = Supermask(density=0.2, er_density=0.5, levels=1)  # no levels: nothing counts steps
    make_trainer(tmp_path / "sm", [sm], max_steps=4).fit(TwoOptimizers(), random_loader())


def test_manual_optimization_with_two_steps_per_batch_raises(tmp_path):
    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [SET(density=0.3, update_every_steps=2)], max_steps=8)
    with pytest.raises(RuntimeError, match="this batch took 2 optimizer steps"):
        trainer.fit(ManualSteps(2), random_loader())


def test_manual_optimization_with_one_step_per_batch_counts_like_automatic(tmp_path):
    """RigL stop_updates_at=0.75 of 8 batches stops at step 6 with manual steps too: updates at 2 and 4."""

    steps = []

    class Spy(RigL):
        def _update(self, trainer, pl_module, step, pruning, regrow):  # noqa: ANN001, ANN202
            steps.append(step)
            super()._update(trainer, pl_module, step, pruning, regrow)

    torch.manual_seed(0)
    cb = Spy(density=0.3, distribution="uniform", update_every_steps=2, stop_updates_at=0.75)
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=2)  # 4 batches per epoch: 8 steps
    module = ManualSteps(1)
    trainer.fit(module, random_loader())
    assert trainer.global_step == 8 and cb._stop_step == 6
    assert steps == [2, 4]
    for name, p in module.named_parameters():
        if name in cb.masked.masks:
            assert (p[~cb.masked.masks[name]] == 0).all()
