"""Profiles, presets and overrides resolve in a fixed order."""

from __future__ import annotations

import pytest

from matchclip.config import RunConfig, load_profile, profile_names, resolve_config
from matchclip.errors import ConfigError


def test_profiles_include_paper_and_demo():
    assert {"paper", "demo"} <= set(profile_names())


def test_demo_profile_uses_demo_preset():
    config = resolve_config("demo")
    assert config.preset == "demo"
    assert config.backbone == "matchclip-tiny-vit32"
    assert config.pretrained is None
    assert config.profile == "demo"


def test_paper_profile_keeps_report_recipe():
    config = resolve_config("paper")
    assert config.epochs == 64
    assert config.batch_size == 32
    assert config.lr == pytest.approx(2.5e-4)
    assert config.weight_decay == pytest.approx(5e-4)
    assert config.betas == (0.9, 0.999)
    assert config.amsgrad is True
    assert config.loss == "bce"


def test_override_beats_profile():
    config = resolve_config("demo", {"epochs": 3, "hidden": 32})
    assert config.epochs == 3
    assert config.hidden == 32


def test_explicit_preset_replaces_head_shape():
    config = resolve_config("demo", {"preset": "huge"})
    assert config.hidden == 1600
    assert config.dropout == pytest.approx(0.3)
    # The profile's training settings stay.
    assert config.epochs == load_profile("demo")["epochs"]


def test_none_override_sets_random_weights():
    config = resolve_config("paper", {"pretrained": None})
    assert config.pretrained is None


def test_unknown_profile_lists_choices():
    with pytest.raises(ConfigError, match="demo"):
        resolve_config("nonexistent")


def test_unknown_setting_is_named():
    with pytest.raises(ConfigError, match="learning_rate"):
        RunConfig.from_dict({"learning_rate": 0.1})


@pytest.mark.parametrize(
    ("setting", "value"),
    [("model", "svm"), ("augment", "mixup"), ("epochs", 0), ("lr", -1.0), ("dropout", 1.5), ("optimizer", "lion")],
)
def test_invalid_value_is_named(setting, value):
    with pytest.raises(ConfigError, match=setting):
        resolve_config("demo", {setting: value})


def test_config_round_trips_through_dict():
    config = resolve_config("demo", {"loss_options": {"gamma": 1.0}})
    assert RunConfig.from_dict(config.to_dict()) == config


def test_warmup_longer_than_run_is_accepted():
    # A run shorter than its profile's warmup warms up throughout; train caps the warmup steps.
    config = resolve_config("demo", {"epochs": 1, "warmup_epochs": 3})
    assert (config.epochs, config.warmup_epochs) == (1, 3)


def test_negative_warmup_is_rejected():
    with pytest.raises(ConfigError, match="warmup_epochs must be at least 0, got -1"):
        resolve_config("demo", {"warmup_epochs": -1})
