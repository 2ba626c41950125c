"""Progress and results of long set-up work: SynFlow rounds, SNIP/GraSP batches, ortho repair, IMP levels."""

from __future__ import annotations

import logging

import torch
from conftest import PlainModule, make_trainer, random_loader

from er_lightning.callbacks import IterativeMagnitudePruning, StaticSparsity
from er_lightning.callbacks.feedback import LogReporter
from er_lightning.sparsity.init import ortho_objective
from er_lightning.sparsity.progress import report, reporting
from er_lightning.sparsity.scores import grasp_scores, snip_scores, synflow_masks

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int, int]] = []

    def __call__(self, task, done, total, values):  # noqa: ANN001
        self.calls.append((task, done, total))


def _data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x, y) for x, y in random_loader(n=16 * n, batch_size=16)]


def test_library_functions_report_each_round_and_batch() -> None:
    torch.manual_seed(0)
    net = PlainModule()
    rec = Recorder()
    with reporting(rec):
        synflow_masks(net, NAMES, 0.2, input_shape=[3, 8, 8], rounds=4)
        snip_scores(net, NAMES, _data(3), num_batches=3)
        grasp_scores(net, NAMES, _data(2), num_batches=2)
    assert rec.calls == [
        *[("synflow rounds", r, 4) for r in range(1, 5)],
        *[("snip batches", b, 3) for b in range(1, 4)],
        *[("grasp batches (2 passes)", b, 4) for b in range(1, 5)],
    ]
    report("outside", 1, 1)  # no reporter installed: nothing happens
    assert len(rec.calls) == 11


def test_log_reporter_writes_start_deciles_and_end(caplog) -> None:
    rep = LogReporter("X")
    with caplog.at_level(logging.INFO, logger="er_lightning.callbacks.feedback"):
        for r in range(1, 101):
            rep("synflow rounds", r, 100, {"density": 0.5})
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines[0] == "X: synflow rounds 1/100 (density 0.5)"
    assert lines[-1] == "X: synflow rounds 100/100 (density 0.5)"
    assert [int(line.split()[3].split("/")[0]) for line in lines] == [
        1,
        10,
        20,
        30,
        40,
        50,
        60,
        70,
        80,
        90,
        100,
    ]


def test_progress_bar_on_a_terminal(capsys) -> None:
    rep = LogReporter("X", bar=True)
    for b in range(1, 4):
        rep("snip batches", b, 3, {})
    assert "X: snip batches" in capsys.readouterr().err
    assert not rep._bars  # closed at the end


def test_synflow_setup_logs_its_rounds(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    module = PlainModule()
    module.input_shape = (3, 8, 8)
    cb = StaticSparsity(density=0.1, distribution="synflow", placement="scores", rounds=20)
    trainer = make_trainer(tmp_path, [cb], max_steps=1)
    with caplog.at_level(logging.INFO, logger="er_lightning.callbacks.feedback"):
        trainer.fit(module, train_dataloaders=random_loader())
    lines = [r.getMessage() for r in caplog.records if r.name == "er_lightning.callbacks.feedback"]
    assert lines[0].startswith("StaticSparsity: synflow rounds 1/20")
    assert lines[-1].startswith("StaticSparsity: synflow rounds 20/20")


def test_ortho_repair_logs_objective_before_and_after(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    module = PlainModule()
    cb = StaticSparsity(density=0.3, ortho_repair=True, ortho_steps=50, ortho_lr=0.05)
    with caplog.at_level(logging.INFO):
        make_trainer(tmp_path, [cb], max_steps=1).fit(module, train_dataloaders=random_loader())
    assert list(cb.ortho_objectives) == NAMES
    for before, after in cb.ortho_objectives.values():
        assert after < before
    lines = [r.getMessage() for r in caplog.records if "ortho repair" in r.getMessage()]
    assert [line.split()[4] for line in lines if "(layers)" in line] == ["1/3", "2/3", "3/3"]
    total_before = sum(b for b, _ in cb.ortho_objectives.values())
    total_after = sum(a for _, a in cb.ortho_objectives.values())
    assert f"{total_before:.6g} → {total_after:.6g}" in lines[-1]


def test_ortho_objective_by_hand() -> None:
    w = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
    m = torch.tensor([[True, False], [True, True]])
    # M⊙W = [[1, 0], [0, 1]] → (M⊙W)(M⊙W)ᵀ − I = 0
    assert ortho_objective(w, m) == 0.0
    # unmasked: [[5, 2], [2, 1]] − I = [[4, 2], [2, 0]] → √24
    assert abs(ortho_objective(w, torch.ones(2, 2, dtype=torch.bool)) - 24**0.5) < 1e-6


def test_imp_level_in_the_progress_bar(tmp_path) -> None:
    torch.manual_seed(0)
    cb = IterativeMagnitudePruning(epochs_per_level=1, levels=2, save_dir=str(tmp_path / "m"))
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=2)
    trainer.fit(PlainModule(), train_dataloaders=random_loader())
    assert float(trainer.progress_bar_metrics["imp/level"]) == 1.0  # one prune done, in the second level
