"""The shared mask engine under faults: tampered checkpoints, stage order, replaced layers, empty models and
odd arguments (issue 12 #4, #5, #7, #8, #10)."""

from __future__ import annotations

import pytest
import torch
from conftest import PlainModule, make_trainer, random_loader
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from er_lightning.callbacks import RigL, SoftThreshold, StaticSparsity, Supermask

NAMES = ["net.conv1.weight", "net.conv2.weight", "net.fc.weight"]


# ---------------------------------------------------------------------------------------------- #4 tampered masks
def _fit_checkpoint(tmp_path) -> str:  # noqa: ANN001
    torch.manual_seed(0)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    trainer = make_trainer(tmp_path, [StaticSparsity(density=0.3, seed=1), ckpt], enable_checkpointing=True)
    trainer.fit(PlainModule(), random_loader())
    return str(tmp_path / "ckpt" / "last.ckpt")


def _resume(tmp_path, path: str) -> StaticSparsity:  # noqa: ANN001
    cb = StaticSparsity(density=0.3, seed=1)
    make_trainer(tmp_path / "resume", [cb], max_steps=6).fit(PlainModule(), random_loader(), ckpt_path=path)
    return cb


@pytest.mark.parametrize(
    "tamper, match",
    [
        (
            lambda m: torch.ones_like(m),
            r"net\.conv2\.weight: keeps 1152 of 1152 weights, the checkpoint recorded 190",
        ),
        (
            lambda m: torch.full(m.shape, float("nan")),
            r"net\.conv2\.weight: a torch\.strided torch\.float32 tensor",
        ),
        (lambda m: m.to(torch.uint8), r"net\.conv2\.weight: a torch\.strided torch\.uint8 tensor"),
        (lambda m: m.to_sparse(), r"net\.conv2\.weight: a torch\.sparse_coo torch\.bool tensor"),
    ],
    ids=["all_true", "nan", "uint8", "sparse"],
)
def test_tampered_checkpoint_masks_are_refused(tmp_path, tamper, match) -> None:  # noqa: ANN001
    path = _fit_checkpoint(tmp_path)
    checkpoint = torch.load(path, weights_only=False)
    state = checkpoint["callbacks"]["StaticSparsity"]
    assert state["counts"]["net.conv2.weight"] == int(state["masks"]["net.conv2.weight"].sum()) == 190
    state["masks"]["net.conv2.weight"] = tamper(state["masks"]["net.conv2.weight"])
    torch.save(checkpoint, tmp_path / "tampered.ckpt")
    with pytest.raises(ValueError, match=match) as info:
        _resume(tmp_path, str(tmp_path / "tampered.ckpt"))
    assert "edited or damaged" in str(info.value)


def test_intact_and_older_checkpoints_still_resume(tmp_path) -> None:  # noqa: ANN001
    path = _fit_checkpoint(tmp_path)
    saved = torch.load(path, weights_only=False)["callbacks"]["StaticSparsity"]["masks"]
    assert all(torch.equal(_resume(tmp_path, path).masked.masks[n], saved[n]) for n in NAMES)
    checkpoint = torch.load(path, weights_only=False)
    del checkpoint["callbacks"]["StaticSparsity"]["counts"]  # written before masks were counted
    torch.save(checkpoint, tmp_path / "old.ckpt")
    assert all(
        torch.equal(_resume(tmp_path, str(tmp_path / "old.ckpt")).masked.masks[n], saved[n]) for n in NAMES
    )


# ------------------------------------------------------------------------------------ #5 init once, any stage order
def _make(kind: str):  # noqa: ANN202
    if kind == "he_sparse":
        return StaticSparsity(density=0.3, init="he_sparse", seed=2)
    if kind == "ortho_repair":
        return StaticSparsity(density=0.5, ortho_repair=True, ortho_steps=3, seed=2)
    if kind == "supermask":
        return Supermask(density=0.2, er_density=0.5, weight_init="kn-zero-bias", seed=2)
    return SoftThreshold(density=0.5, init="kaiming_normal", s_init=-5.0, seed=2)


@pytest.mark.parametrize("kind", ["he_sparse", "ortho_repair", "supermask", "soft_threshold"])
def test_init_and_repairs_run_exactly_once_whatever_stage_comes_first(tmp_path, kind: str) -> None:
    def run(stages: list[str]) -> tuple[dict[str, torch.Tensor], int]:
        torch.manual_seed(0)
        module = PlainModule()
        cb = _make(kind)
        calls = []
        original = cb.init_weights_
        cb.init_weights_ = lambda m: (calls.append(1), original(m))  # type: ignore[method-assign]
        trainer = make_trainer(tmp_path, [cb], max_steps=2, limit_val_batches=1)
        for stage in stages:
            if stage == "fit":
                trainer.fit(module, random_loader())
            else:
                trainer.validate(module, random_loader(n=16), verbose=False)
        return {k: v.detach().clone() for k, v in module.state_dict().items()}, len(calls)

    reference, calls = run(["fit"])
    assert calls == 1
    for order in (["validate", "fit"], ["validate", "validate", "fit", "validate"]):
        state, calls = run(order)
        assert calls == 1, order
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            assert torch.equal(state[key], value), (order, key)


# --------------------------------------------------------------------------------------------- #7 replaced layers
class _ReplacesConv2OnFitStart(PlainModule):
    def on_fit_start(self) -> None:
        # same shape, new tensor, after the callback's on_fit_start
        self.net.conv2.weight = nn.Parameter(torch.ones(16, 8, 3, 3))

    def configure_optimizers(self):  # noqa: ANN201
        return torch.optim.SGD(self.parameters(), lr=0.0)  # lr 0: only the masking can change weights


class _ReshapesConv2InSetup(PlainModule):
    def setup(self, stage: str) -> None:
        self.net.conv2 = nn.Conv2d(8, 16, 1, bias=False)  # after the callback drew a 16x8x3x3 mask


def test_layer_replaced_in_on_fit_start_is_masked_and_named(tmp_path) -> None:  # noqa: ANN001
    torch.manual_seed(0)
    module = _ReplacesConv2OnFitStart()
    cb = StaticSparsity(density=0.3, seed=1)
    with pytest.warns(
        UserWarning, match=r"parameters \['net\.conv2\.weight'\] were replaced after on_fit_start"
    ):
        make_trainer(tmp_path, [cb], max_steps=2).fit(module, random_loader())
    mask = cb.masked.masks["net.conv2.weight"]
    assert cb.masked.params[NAMES.index("net.conv2.weight")] is module.net.conv2.weight
    assert int(torch.count_nonzero(module.net.conv2.weight)) == int(mask.sum()) == 190  # of 1152: not dense
    assert torch.equal(module.net.conv2.weight != 0, mask)


def test_layer_replaced_with_another_shape_in_setup_names_it(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(
        ValueError, match=r"net\.conv2\.weight: mask \(16, 8, 3, 3\), parameter now \(16, 8, 1, 1\)"
    ):
        make_trainer(tmp_path, [StaticSparsity(density=0.3)], max_steps=1).fit(
            _ReshapesConv2InSetup(), random_loader()
        )


class _NewConv2(PlainModule):
    def __init__(self, hook: str) -> None:
        super().__init__()
        self.hook = hook

    def _replace(self) -> None:
        self.net.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)  # same shape, no parametrization

    def setup(self, stage: str) -> None:
        if self.hook == "setup":
            self._replace()

    def on_fit_start(self) -> None:
        if self.hook == "on_fit_start":
            self._replace()


@pytest.mark.parametrize("hook", ["setup", "on_fit_start"])
@pytest.mark.parametrize(
    "make, lost",
    [
        (lambda: Supermask(density=0.2, er_density=0.5), "score parametrization"),
        (lambda: SoftThreshold(density=0.5, s_init=-5.0), "soft-threshold parametrization"),
    ],
    ids=["supermask", "soft_threshold"],
)
def test_parametrized_layer_replaced_after_setup_raises(tmp_path, hook: str, make, lost: str) -> None:  # noqa: ANN001
    with pytest.raises(
        RuntimeError, match=rf"\['net\.conv2\.weight'\] were replaced after setup .* removed their {lost}"
    ):
        make_trainer(tmp_path, [make()], max_steps=1).fit(_NewConv2(hook), random_loader())


# ------------------------------------------------------------------------------------------------ #8 empty models
def test_a_density_that_keeps_nothing_raises(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=r"keeps no weight in any of the 3 masked layers \(1528 weights\)"):
        make_trainer(tmp_path, [StaticSparsity(density=1e-12)], max_steps=1).fit(
            PlainModule(), random_loader()
        )


def test_collapsed_layers_are_named(tmp_path) -> None:  # noqa: ANN001
    # uniform 0.001: conv1 round(0.216) = 0, conv2 round(1.152) = 1, fc round(0.16) = 0 weights
    cb = StaticSparsity(density=0.001, distribution="uniform")
    with pytest.warns(
        UserWarning, match=r"layers \['net\.conv1\.weight', 'net\.fc\.weight'\] keep no weight at all"
    ):
        make_trainer(tmp_path, [cb], max_steps=1).fit(PlainModule(), random_loader())
    assert cb.masked.counts() == {
        "net.conv1.weight": (0, 216),
        "net.conv2.weight": (1, 1152),
        "net.fc.weight": (0, 160),
    }


# -------------------------------------------------------------------------------------------- #10 odd arguments
def test_custom_densities_without_the_custom_distribution_raise() -> None:
    with pytest.raises(
        ValueError, match="custom_densities is only read with distribution='custom', got distribution='erk'"
    ):
        StaticSparsity(distribution="erk", custom_densities={"net.fc.weight": 0.5})
    with pytest.raises(ValueError, match="custom_densities is only read"):
        RigL(distribution="balanced", custom_densities={"net.fc.weight": 0.5})


@pytest.mark.parametrize("argument", ["include", "exclude"])
def test_a_single_pattern_string_is_refused(argument: str) -> None:
    with pytest.raises(
        TypeError, match=rf"{argument} must be a list of glob patterns, got the string '\*conv\*'"
    ):
        StaticSparsity(**{argument: "*conv*"})
    cb = StaticSparsity(**{argument: ["*conv*"]})
    assert getattr(cb, argument) == ["*conv*"]


def test_select_targets_refuses_a_string_too() -> None:
    from er_lightning.masking.targets import select_targets

    with pytest.raises(TypeError, match="include must be a list of glob patterns"):
        select_targets(PlainModule(), include="*conv*")
    assert select_targets(PlainModule(), include=["*conv*"]) == ["net.conv1.weight", "net.conv2.weight"]


def test_a_sparse_checkpoint_needs_its_callback_to_resume(tmp_path) -> None:  # noqa: ANN001
    """#9: SparseLightningModule refuses a dense resume of a sparse checkpoint and names what to add."""
    from conftest import TinyNet

    from er_lightning.module import SparseLightningModule

    def module() -> SparseLightningModule:
        torch.manual_seed(0)
        return SparseLightningModule(TinyNet(), num_classes=10, lr=0.05, lr_schedule="constant")

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, [StaticSparsity(density=0.3, seed=1), ckpt], enable_checkpointing=True).fit(
        module(), random_loader()
    )
    path = tmp_path / "ckpt" / "last.ckpt"
    with pytest.raises(
        RuntimeError, match=r"trained sparse by er_lightning\.callbacks\.static\.StaticSparsity"
    ) as info:
        make_trainer(tmp_path / "dense", [], max_steps=6).fit(module(), random_loader(), ckpt_path=path)
    assert "'density': 0.3" in str(
        info.value
    ) and "class_path: er_lightning.callbacks.static.StaticSparsity" in str(info.value)
    evaluated = module()  # evaluating needs no callback: the weights hold their zeros
    make_trainer(tmp_path / "eval", [], limit_val_batches=1).validate(
        evaluated, random_loader(n=16), ckpt_path=path, verbose=False
    )
    resumed_cb = StaticSparsity(density=0.3, seed=1)
    trainer = make_trainer(tmp_path / "sparse", [resumed_cb], max_steps=6)
    trainer.fit(module(), random_loader(), ckpt_path=path)
    assert trainer.global_step == 6  # resumed (from step 4) with the callback attached
