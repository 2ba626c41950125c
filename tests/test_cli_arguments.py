"""The command line checks and explains: typed arguments fail at parse time, every option has a description."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import get_args

import pytest
import torch
from conftest import PlainModule, make_trainer, random_loader
from jsonargparse._parameter_resolvers import get_signature_parameters
from pytorch_lightning.callbacks import Callback

import er_lightning.callbacks as callbacks
from er_lightning.callbacks import GMP, GraNet, RigL, Supermask
from er_lightning.callbacks.base import DISTRIBUTION_ALIASES, Distribution
from er_lightning.cli import main
from er_lightning.sparsity.distributions import DENSITY_METHODS
from er_lightning.sparsity.schedules import CallableDrop

QUICKSTART = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")


@pytest.fixture(autouse=True)
def _no_cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def _parse_error(capsys, *args: str) -> str:  # noqa: ANN001
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", QUICKSTART, *args, "--print_config"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_distribution_fails_at_parse_time_listing_valid_names(capsys) -> None:
    err = _parse_error(capsys, "--trainer.callbacks.distribution", "erkk")
    assert "Got value: erkk" in err
    for name in ("'uniform'", "'erk'", "'balanced'", "'ER_same_params_per_layer'", "'snip'", "'from_mask'"):
        assert name in err
    assert "Traceback" not in err


def test_density_out_of_range_is_one_short_message(capsys) -> None:
    err = _parse_error(capsys, "--trainer.callbacks.density", "1.5")
    assert "Not of type Density: 1.5 does not conform to restriction v>0 and v<=1" in err
    assert "Traceback" not in err
    assert len(err.splitlines()) < 20  # a one-line usage, not every option of the trainer


def test_distribution_type_lists_every_rule_and_alias() -> None:
    assert set(get_args(Distribution)) == set(DENSITY_METHODS) | set(DISTRIBUTION_ALIASES)


@pytest.mark.parametrize("name", [n for n in callbacks.__all__ if isinstance(getattr(callbacks, n), type)])
def test_every_callback_option_has_a_description(name) -> None:
    params = get_signature_parameters(getattr(callbacks, name))
    assert params
    assert [p.name for p in params if not p.doc] == []


def test_callback_help_describes_rigl_options(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--trainer.callbacks.help", "RigL"])
    out = capsys.readouterr().out
    for text in (
        "optimizer steps between mask updates",  # update_every_steps
        "share of each layer's active weights replaced",  # drop_fraction
        "prune-and-regrow stops",  # stop_updates_at
        "RigL: ``|g|``",  # growth
        "SGD steps of the ortho repair",  # ortho_steps
    ):
        assert text in " ".join(out.split()), text


def test_granet_and_gmp_take_density_like_every_callback() -> None:
    assert GraNet(density=0.1, final_density=0.01).density == 0.1
    assert GraNet(init_density=0.1, final_density=0.01).density == 0.1  # upstream's spelling
    assert GraNet().density == 0.5 and GMP().density == 1.0  # defaults unchanged
    assert GMP(density=0.5, final_density=0.1).init_density == 0.5
    with pytest.raises(ValueError, match="same argument"):
        GraNet(density=0.1, init_density=0.2, final_density=0.01)
    with pytest.raises(ValueError, match="density"):
        GraNet(density=1.5)


def test_supermask_defaults_to_erk_like_the_others() -> None:
    assert Supermask().distribution == RigL().distribution == "erk"


def test_drop_fraction_accepts_any_function_of_the_step(tmp_path) -> None:
    def halving(step: int) -> float:
        return 0.4 * 0.5 ** (step // 4)

    cb = RigL(density=0.3, update_every_steps=2, drop_fraction=halving, stop_updates_at=1.0)
    assert isinstance(cb.drop_schedule, CallableDrop)
    assert cb.mask_config()["drop_fraction"] == {
        "type": "CallableDrop",
        "fn": f"{__name__}.{halving.__qualname__}",
    }
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):  # noqa: ANN001
            if cb.last_update is not None:
                seen.append((cb.last_update.step, cb.last_update.drop_fraction))

    torch.manual_seed(0)
    trainer = make_trainer(tmp_path, [cb, Probe()], max_steps=6)
    trainer.fit(PlainModule(), train_dataloaders=random_loader(n=96))
    assert sorted(set(seen)) == [(2, 0.4), (4, 0.2)]  # halving(2) and halving(4) at the two updates
    with pytest.raises(ValueError, match="must be in"):
        CallableDrop(lambda step: 1.5)(0, 10)
