"""TensorBoard figures: drawn from the right numbers, written at every mask change, skipped for other loggers."""

from __future__ import annotations

import pytest
import torch
from conftest import PlainModule, make_trainer, random_loader
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from er_lightning.callbacks import IterativeMagnitudePruning, RigL, SoftThreshold, StaticSparsity
from er_lightning.callbacks.figures import (
    FigureWriter,
    dead_units_figure,
    density_figure,
    mask_image,
    short_names,
)
from er_lightning.sparsity.topology import dead_units, itop_rate, mask_overlap

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]


def test_short_names_drop_common_prefix_and_weight() -> None:
    assert short_names(NAMES) == ["conv1", "conv2", "fc"]
    assert short_names(["model.layer1.0.conv1.weight", "model.fc.bias"]) == ["layer1.0.conv1", "fc.bias"]


def test_density_figure_draws_each_layer_and_its_target() -> None:
    fig = density_figure(NAMES, [0.5, 0.1, 0.02], [0.4, 0.1, 0.03])
    ax = fig.axes[0]
    assert [p.get_width() for p in ax.patches] == pytest.approx([0.5, 0.1, 0.02])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["conv1", "conv2", "fc"]
    targets = ax.collections[0].get_offsets()
    assert targets[:, 0].tolist() == pytest.approx([0.4, 0.1, 0.03])


def test_topology_numbers_on_a_hand_made_mask() -> None:
    # linear 3 outputs x 4 inputs: output 1 has no input, inputs 2 and 3 feed nothing
    m = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    out, inp = dead_units(m)
    assert out.tolist() == [False, True, False] and inp.tolist() == [False, False, True, True]
    conv = torch.zeros(2, 3, 3, 3, dtype=torch.bool)
    conv[0, 1, 2, 2] = True
    out, inp = dead_units(conv)
    assert out.tolist() == [False, True] and inp.tolist() == [True, False, True]
    initial = torch.tensor([1, 1, 0, 0], dtype=torch.bool)
    assert mask_overlap(torch.tensor([1, 0, 1, 0], dtype=torch.bool), initial) == 0.5
    assert itop_rate(torch.tensor([1, 1, 1, 0], dtype=torch.bool)) == 0.75
    fig = dead_units_figure(["a.weight"], [1], [3], [2], [4])
    assert [p.get_width() for p in fig.axes[0].patches] == pytest.approx([1 / 3, 2 / 4])


def test_mask_image_only_for_small_layers() -> None:
    m = torch.rand(4, 2, 3, 3) < 0.5
    image = mask_image(m)
    assert image.shape == (1, 4, 18) and torch.equal(image[0].bool(), m.reshape(4, 18))
    assert mask_image(torch.ones(512, 512, 3, 3, dtype=torch.bool)) is None
    assert mask_image(torch.ones(5, dtype=torch.bool)) is None


def test_heatmap_history_has_one_column_per_mask_change() -> None:
    fw = FigureWriter("RigL", topology=True)
    fw.record(0, {"a": 0.5, "b": 0.1})
    fw.record(10, {"a": 0.4, "b": 0.2})
    fw.record(10, {"a": 0.3, "b": 0.2})  # the same step again replaces its column
    assert fw.history == [(0, [0.5, 0.1]), (10, [0.3, 0.2])]


def _events(log_dir: str) -> EventAccumulator:
    acc = EventAccumulator(log_dir, size_guidance={"images": 0, "histograms": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def _tb(tmp_path) -> TensorBoardLogger:  # noqa: ANN001
    return TensorBoardLogger(str(tmp_path), name="tb", default_hp_metric=False)


def test_rigl_writes_figures_at_every_mask_change_and_epoch_end(tmp_path) -> None:
    torch.manual_seed(0)
    cb = RigL(density=0.3, update_every_steps=2, drop_fraction=0.3, stop_updates_at=1.0, seed=0)
    logger = _tb(tmp_path)
    # 8 batches per epoch, 2 epochs: updates at steps 2, 4, ..., 14 (7 mask changes)
    trainer = make_trainer(tmp_path, [cb], max_steps=16, max_epochs=2, logger=logger)
    trainer.fit(PlainModule(), train_dataloaders=random_loader(n=128, batch_size=16))
    acc = _events(logger.log_dir)
    bars = [e.step for e in acc.Images("sparsity/layer_densities")]
    assert bars == [0, 2, 4, 6, 8, 10, 12, 14]  # train start, then each update, at the update's step
    assert len(cb.figures.history) == 8
    assert [e.step for e in acc.Images("sparsity/density_heatmap")] == [8, 16]  # epoch ends
    assert [e.step for e in acc.Images("sparsity/dead_units")] == [8, 16]
    assert [e.step for e in acc.Images("dst/itop_overlap")] == [8, 16]
    for name in NAMES:
        hist = acc.Histograms(f"weights/{name}")
        assert [e.step for e in hist] == [8, 16]
        kept = int(cb.masked.masks[name].sum())
        assert hist[-1].histogram_value.num == kept  # |w| of the active weights only
        assert [e.step for e in acc.Images(f"masks/{name}")] == [8, 16]
    # HPARAMS: the callback's config and the final metrics
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["sparsity/method"].string_value == "RigL"
    assert hparams["sparsity/density"].number_value == 0.3
    assert hparams["sparsity/distribution"].string_value == "erk"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert {"hp/density_final", "hp/flops/train_cumulative_ratio"} <= {
        m.name.tag for m in experiment.metric_infos
    }
    final = acc.Scalars("hp/density_final")
    assert final[-1].value == pytest.approx(0.3, abs=1e-3)
    text = acc.Tensors("sparsity/layers/text_summary")
    assert b"whole model" in text[0].tensor_proto.string_val[0]


def test_imp_levels_and_str_epochs_refresh_the_bar_chart(tmp_path) -> None:
    torch.manual_seed(0)
    cb = IterativeMagnitudePruning(epochs_per_level=1, levels=2, save_dir=str(tmp_path / "masks"))
    logger = _tb(tmp_path / "imp")
    trainer = make_trainer(tmp_path, [cb], max_steps=-1, max_epochs=3, logger=logger)
    trainer.fit(PlainModule(), train_dataloaders=random_loader())
    steps = [e.step for e in _events(logger.log_dir).Images("sparsity/layer_densities")]
    assert steps == [0, 4, 8]  # train start, level 1 after epoch 1, level 2 after epoch 2

    torch.manual_seed(0)
    st = SoftThreshold(density=0.5, s_init=-5.0)
    logger = _tb(tmp_path / "str")
    trainer = make_trainer(tmp_path, [st], max_steps=-1, max_epochs=2, logger=logger)
    trainer.fit(PlainModule(), train_dataloaders=random_loader())
    acc = _events(logger.log_dir)
    assert [e.step for e in acc.Images("sparsity/layer_densities")] == [0, 4, 8]
    assert [e.step for e in acc.Images("sparsity/density_heatmap")] == [4, 8]


def test_other_loggers_get_no_figures(tmp_path, tiny_module) -> None:
    cb = StaticSparsity(density=0.2)
    trainer = make_trainer(tmp_path, [cb], max_steps=3, logger=CSVLogger(str(tmp_path)))
    trainer.fit(tiny_module, train_dataloaders=random_loader())  # nothing to draw into: no error
    assert cb.figures.history  # the densities were still recorded
