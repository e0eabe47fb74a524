"""Training runs: run folder, determinism, resume, baselines and option checks."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import matchclip.train as train_module
from matchclip.config import resolve_config
from matchclip.demo import generate_demo_dataset
from matchclip.errors import ConfigError
from matchclip.train import train, warmup_cosine


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    """A small demo data set and a shared feature cache folder."""
    root = tmp_path_factory.mktemp("demo")
    labels = generate_demo_dataset(root / "data", seed=1, num_train=160, num_val=48, num_test=16)
    return {"labels": str(labels), "images": str(root / "data" / "coco"), "cache_dir": str(root / "cache")}


def small_config(small_demo, out, **overrides):
    settings = {
        **small_demo,
        "out": str(out),
        "epochs": 3,
        "hidden": 32,
        "mlp": 64,
        "heads": 2,
        "warmup_epochs": 1,
        **overrides,
    }
    return resolve_config("demo", settings)


def metric_rows(run_dir):
    # Wall-clock seconds differ between runs; every other column must match.
    return pd.read_csv(run_dir / "metrics.csv").drop(columns=["seconds"])


def test_warmup_cosine_shape():
    factors = [warmup_cosine(step, warmup_steps=4, total_steps=12) for step in range(12)]
    assert factors[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert factors[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert warmup_cosine(12, warmup_steps=4, total_steps=12) == pytest.approx(0.0)


def test_run_folder_contents(small_demo, tmp_path):
    result = train(small_config(small_demo, tmp_path / "run"))
    run_dir = tmp_path / "run"
    for name in ("config.json", "metrics.csv", "last.pt", "best.pt", "val_predictions.csv", "val_scores.npy", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert len(metric_rows(run_dir)) == 3
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 3
    predictions = pd.read_csv(run_dir / "val_predictions.csv")
    assert len(predictions) == 48
    assert 0.0 <= result.best_score <= 1.0
    assert result.best_epoch in (0, 1, 2)


def test_same_seed_same_metrics(small_demo, tmp_path):
    train(small_config(small_demo, tmp_path / "a"))
    train(small_config(small_demo, tmp_path / "b"))
    pd.testing.assert_frame_equal(metric_rows(tmp_path / "a"), metric_rows(tmp_path / "b"))
    first = np.load(tmp_path / "a" / "val_scores.npy")
    second = np.load(tmp_path / "b" / "val_scores.npy")
    assert np.array_equal(first, second)


def test_other_seed_other_metrics(small_demo, tmp_path):
    train(small_config(small_demo, tmp_path / "a", seed=0))
    train(small_config(small_demo, tmp_path / "b", seed=1))
    first = metric_rows(tmp_path / "a")["train_loss"].to_numpy()
    second = metric_rows(tmp_path / "b")["train_loss"].to_numpy()
    assert not np.array_equal(first, second)


def test_killed_run_resumes_to_same_metrics(small_demo, tmp_path, monkeypatch):
    settings = {"epochs": 4, "augment": "flip", "balanced": True, "batch_size": 64}
    train(small_config(small_demo, tmp_path / "straight", **settings))

    real_evaluate = train_module.evaluate_scores
    calls = {"count": 0}

    def evaluate_then_die(*args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt("simulated kill during epoch 3")
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_module, "evaluate_scores", evaluate_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(small_config(small_demo, tmp_path / "resumed", **settings))
    assert len(metric_rows(tmp_path / "resumed")) == 2
    assert not (tmp_path / "resumed" / "summary.json").exists()

    monkeypatch.setattr(train_module, "evaluate_scores", real_evaluate)
    train(small_config(small_demo, tmp_path / "resumed", **settings))
    pd.testing.assert_frame_equal(metric_rows(tmp_path / "straight"), metric_rows(tmp_path / "resumed"))


def test_finished_run_is_not_retrained(small_demo, tmp_path, monkeypatch):
    first = train(small_config(small_demo, tmp_path / "run", epochs=1))

    def fail(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_module, "_train_loop", fail)
    second = train(small_config(small_demo, tmp_path / "run", epochs=1))
    assert second.best_metrics == first.best_metrics


def test_other_settings_in_run_folder_rejected(small_demo, tmp_path):
    train(small_config(small_demo, tmp_path / "run", epochs=1))
    with pytest.raises(ConfigError, match="hidden"):
        train(small_config(small_demo, tmp_path / "run", epochs=1, hidden=48))


def test_balanced_batch_too_small_rejected(small_demo, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="batch"):
        train(small_config(small_demo, tmp_path / "run", balanced=True, batch_size=8))


@pytest.mark.parametrize("loss", ["focal", "label_smoothing", "asymmetric"])
def test_alternative_losses_train(small_demo, tmp_path, loss):
    result = train(small_config(small_demo, tmp_path / loss, epochs=1, loss=loss))
    assert np.isfinite(result.history[0]["train_loss"])


def test_no_relation_tokens_trains(small_demo, tmp_path):
    result = train(small_config(small_demo, tmp_path / "run", epochs=1, relation_tokens=False))
    assert np.isfinite(result.history[0]["train_loss"])


def test_linear_probe_trains(small_demo, tmp_path):
    result = train(small_config(small_demo, tmp_path / "run", model="linear_probe", epochs=2))
    assert len(result.history) == 2


def test_zero_shot_scores_without_training(small_demo, tmp_path):
    result = train(small_config(small_demo, tmp_path / "run", model="zero_shot"))
    assert 0.0 <= result.best_score <= 1.0
    assert (tmp_path / "run" / "val_predictions.csv").is_file()


def test_resnet_trains_from_images(small_demo, tmp_path):
    result = train(
        small_config(
            small_demo,
            tmp_path / "run",
            model="resnet",
            resnet_arch="resnet18",
            resnet_weights=None,
            resnet_image_size=32,
            optimizer="sgd",
            epochs=1,
        )
    )
    assert np.isfinite(result.history[0]["train_loss"])


def test_randaugment_trains_from_images(small_demo, tmp_path):
    result = train(small_config(small_demo, tmp_path / "run", augment="randaugment", epochs=1))
    assert np.isfinite(result.history[0]["train_loss"])


def test_logit_adjustment_changes_scores(small_demo, tmp_path):
    plain = train(small_config(small_demo, tmp_path / "plain", epochs=1))
    adjusted = train(small_config(small_demo, tmp_path / "adjusted", epochs=1, logit_adjustment=1.0))
    assert not np.array_equal(
        np.load(plain.run_dir / "val_scores.npy"), np.load(adjusted.run_dir / "val_scores.npy")
    )


@pytest.mark.parametrize("model", ["matchclip", "linear_probe"])
def test_prior_bias_starts_at_class_frequencies(model):
    import torch

    from matchclip.experiment import build_trained_module

    targets = np.zeros((8, 56), dtype=np.float32)
    targets[:6, 6] = 1  # frequency 0.75
    targets[:2, 7] = 1  # frequency 0.25
    config = resolve_config("demo", {"model": model})
    module = build_trained_module(config, image_width=16, text_width=16)

    train_module.init_bias_from_prior(module, targets)

    last = [layer for layer in module.modules() if isinstance(layer, torch.nn.Linear)][-1]
    probabilities = torch.sigmoid(last.bias.detach()).numpy()
    np.testing.assert_allclose(probabilities[[6, 7]], [0.75, 0.25], rtol=1e-6)
    np.testing.assert_allclose(probabilities[8], 1e-4, rtol=1e-3)  # absent class: clipped, finite


def test_prior_bias_needs_an_output_layer():
    import torch

    with pytest.raises(ConfigError, match="prior_bias needs an output nn.Linear with 56 outputs"):
        train_module.init_bias_from_prior(torch.nn.Linear(4, 3), np.zeros((2, 56), dtype=np.float32))


def test_run_shorter_than_warmup_trains(small_demo, tmp_path):
    train(small_config(small_demo, tmp_path / "run", epochs=1, warmup_epochs=3))
    learning_rates = pd.read_csv(tmp_path / "run" / "metrics.csv")["lr"]
    # The whole run is warmup: the learning rate is still rising at its end.
    assert 0 < learning_rates.iloc[-1] <= resolve_config("demo").lr


def test_fused_adamw_matches_foreach():
    import torch

    from matchclip.config import RunConfig
    from matchclip.train import build_optimizer

    torch.manual_seed(0)
    fused_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    plain_model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    plain_model.load_state_dict(fused_model.state_dict())
    config = RunConfig(lr=1e-2)
    fused = build_optimizer(config, fused_model.parameters())
    plain = torch.optim.AdamW(plain_model.parameters(), lr=1e-2, weight_decay=5e-4, amsgrad=True, foreach=True)

    inputs, targets = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(20):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(model(inputs), targets).backward()
            optimizer.step()

    assert fused.param_groups[0]["fused"] is True
    assert fused.param_groups[0]["amsgrad"] is True
    for fused_parameter, plain_parameter in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(fused_parameter, plain_parameter, rtol=1e-5, atol=1e-6)


def test_sgd_keeps_its_own_update():
    import torch

    from matchclip.config import RunConfig
    from matchclip.train import build_optimizer

    optimizer = build_optimizer(RunConfig(optimizer="sgd", lr=0.1), [torch.nn.Parameter(torch.zeros(3))])

    assert isinstance(optimizer, torch.optim.SGD)
    assert optimizer.param_groups[0]["momentum"] == 0.9
    assert not optimizer.param_groups[0].get("fused")


def test_training_revision_is_part_of_the_run_identity(monkeypatch):
    import matchclip.experiment as experiment
    from matchclip.config import RunConfig

    config = RunConfig()
    current = experiment.run_identity(config, "0" * 64)
    monkeypatch.setattr(experiment, "TRAINING_REVISION", experiment.TRAINING_REVISION + 1)

    assert experiment.run_identity(config, "0" * 64) != current


def test_threads_setting_applies_while_training_and_is_restored(small_demo, tmp_path, monkeypatch):
    import torch

    seen = []
    original_loop = train_module._train

    def recording_train(config):
        seen.append(torch.get_num_threads())
        return original_loop(config)

    monkeypatch.setattr(train_module, "_train", recording_train)
    before = torch.get_num_threads()
    train(small_config(small_demo, tmp_path / "run", epochs=1, threads=1))

    assert seen == [1]
    assert torch.get_num_threads() == before


def test_threads_is_part_of_the_run_identity():
    from matchclip.config import RunConfig
    from matchclip.experiment import run_identity

    assert run_identity(RunConfig(threads=1), "0" * 64) != run_identity(RunConfig(threads=2), "0" * 64)


def test_negative_threads_rejected(small_demo, tmp_path):
    with pytest.raises(ConfigError, match="threads must be at least 0"):
        small_config(small_demo, tmp_path / "run", threads=-1)
