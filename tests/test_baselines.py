"""Tests of the linear probe, zero-shot scores and the ResNet baseline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from matchclip.baselines import (
    LinearProbe,
    build_resnet,
    imagenet_weights_path,
    zero_shot_scores,
)
from matchclip.errors import MatchclipError


@pytest.fixture(scope="module")
def resnet18_state(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A seeded random 1000-class resnet18 state dict and the file it is saved in."""
    torch.manual_seed(3)
    state = torchvision.models.resnet18(weights=None).state_dict()
    path = tmp_path_factory.mktemp("weights") / "resnet18_random.pth"
    torch.save(state, path)
    return path, state


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def reject_download(*args, **kwargs):
        raise AssertionError("build_resnet tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", reject_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", reject_download)
    assert torch.hub.get_dir() == str(tmp_path / "torch_home" / "hub")
    return tmp_path / "torch_home"


def test_linear_probe_shape():
    probe = LinearProbe(48, num_classes=56)

    assert probe(torch.randn(5, 48)).shape == (5, 56)


def test_linear_probe_parameters():
    probe = LinearProbe(512)

    assert sum(parameter.numel() for parameter in probe.parameters()) == 512 * 56 + 56


def test_linear_probe_rejects_wrong_width():
    probe = LinearProbe(48)

    with pytest.raises(ValueError, match=r"\[B, 48\]"):
        probe(torch.randn(5, 47))


def test_zero_shot_identical_scores_one():
    vectors = np.random.default_rng(0).normal(size=(4, 16)).astype(np.float32)

    scores = zero_shot_scores(3.0 * vectors, vectors)

    np.testing.assert_allclose(np.diag(scores), np.ones(4), rtol=1e-6)


def test_zero_shot_orthogonal_scores_zero():
    images = np.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]], dtype=np.float32)
    prompts = np.array([[0.0, 0.0, 5.0], [0.0, 0.0, -1.0]], dtype=np.float32)

    np.testing.assert_allclose(zero_shot_scores(images, prompts), np.zeros((2, 2)), atol=1e-7)


def test_zero_shot_opposite_scores_minus_one():
    vector = np.array([[1.0, -2.0, 0.5]], dtype=np.float32)

    np.testing.assert_allclose(zero_shot_scores(vector, -4.0 * vector), [[-1.0]], rtol=1e-6)


def test_zero_shot_ranking():
    prompts = np.eye(4, dtype=np.float32)
    images = np.array([[0.1, 0.2, 0.9, 0.3], [5.0, 0.0, 0.0, 4.0]], dtype=np.float32)

    ranking = np.argsort(-zero_shot_scores(images, prompts), axis=1)

    np.testing.assert_array_equal(ranking[:, :2], [[2, 3], [0, 3]])


def test_zero_shot_ignores_norm():
    rng = np.random.default_rng(1)
    images = rng.normal(size=(3, 8)).astype(np.float32)
    prompts = rng.normal(size=(5, 8)).astype(np.float32)
    scale = np.array([[0.01], [1.0], [100.0]], dtype=np.float32)

    np.testing.assert_allclose(zero_shot_scores(scale * images, prompts), zero_shot_scores(images, prompts), rtol=1e-5)


def test_zero_shot_numpy_in_numpy_out():
    scores = zero_shot_scores(np.ones((2, 4), dtype=np.float16), np.ones((3, 4), dtype=np.float16))

    assert isinstance(scores, np.ndarray)
    assert scores.shape == (2, 3)
    assert scores.dtype == np.float32


def test_zero_shot_torch_in_torch_out():
    images = torch.randn(2, 4)
    prompts = torch.randn(3, 4)

    scores = zero_shot_scores(images, prompts)

    assert isinstance(scores, torch.Tensor)
    assert scores.shape == (2, 3)
    np.testing.assert_allclose(scores.numpy(), zero_shot_scores(images.numpy(), prompts.numpy()), rtol=1e-5, atol=1e-6)


def test_zero_shot_mixed_follows_images():
    images = np.random.default_rng(2).normal(size=(2, 4)).astype(np.float32)
    prompts = torch.randn(3, 4)

    assert isinstance(zero_shot_scores(images, prompts), np.ndarray)
    assert isinstance(zero_shot_scores(torch.from_numpy(images), prompts.numpy()), torch.Tensor)


def test_zero_shot_zero_vector_scores_zero():
    images = np.zeros((1, 4), dtype=np.float32)
    prompts = np.eye(4, dtype=np.float32)

    scores = zero_shot_scores(images, prompts)

    assert np.isfinite(scores).all()
    np.testing.assert_array_equal(scores, np.zeros((1, 4)))


def test_zero_shot_rejects_width_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 4\).*\(3, 5\)"):
        zero_shot_scores(np.ones((2, 4)), np.ones((3, 5)))


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_resnet_random_shape(arch):
    torch.manual_seed(0)
    model = build_resnet(arch, weights=None, num_classes=56).eval()

    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))

    assert logits.shape == (2, 56)


def test_resnet_unknown_arch():
    with pytest.raises(MatchclipError, match="resnet101.*resnet18, resnet34, resnet50"):
        build_resnet("resnet101", weights=None)


def test_resnet_imagenet_missing_names_path(empty_torch_home):
    expected = empty_torch_home / "hub" / "checkpoints" / "resnet18-f37072fd.pth"

    with pytest.raises(MatchclipError) as caught:
        build_resnet("resnet18", weights="imagenet")

    message = str(caught.value)
    assert str(expected) in message
    assert str(expected.parent) in message
    assert "weights=None" in message


def test_resnet_imagenet_path_follows_enum():
    url = torchvision.models.ResNet50_Weights.DEFAULT.url

    assert imagenet_weights_path("resnet50").name == url.rsplit("/", 1)[1]


def test_resnet_imagenet_loads_from_cache(empty_torch_home, resnet18_state):
    _, state = resnet18_state
    cached = imagenet_weights_path("resnet18")
    cached.parent.mkdir(parents=True)
    torch.save(state, cached)

    model = build_resnet("resnet18", weights="imagenet", num_classes=7)

    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert torch.equal(model.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])
    assert model.fc.out_features == 7


def test_resnet_file_loads(resnet18_state):
    path, state = resnet18_state

    model = build_resnet("resnet18", weights=path, num_classes=56)

    assert torch.equal(model.conv1.weight, state["conv1.weight"])
    assert model.fc.out_features == 56
    assert model.fc.in_features == 512


def test_resnet_file_as_string(resnet18_state):
    path, state = resnet18_state

    model = build_resnet("resnet18", weights=str(path))

    assert torch.equal(model.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_resnet_finetuned_file_keeps_fc(tmp_path):
    torch.manual_seed(4)
    trained = build_resnet("resnet18", weights=None, num_classes=56)
    path = tmp_path / "finetuned.pth"
    torch.save({"state_dict": {f"module.{key}": value for key, value in trained.state_dict().items()}}, path)

    model = build_resnet("resnet18", weights=path, num_classes=56)

    assert torch.equal(model.fc.weight, trained.fc.weight)
    assert torch.equal(model.conv1.weight, trained.conv1.weight)


def test_resnet_file_wrong_arch(resnet18_state):
    path, _ = resnet18_state

    with pytest.raises(MatchclipError, match=rf"{path.name} do not fit torchvision resnet34"):
        build_resnet("resnet34", weights=path)


def test_resnet_file_missing(tmp_path):
    path = tmp_path / "absent.pth"

    with pytest.raises(MatchclipError, match=r"absent\.pth not found"):
        build_resnet("resnet18", weights=path)


def test_resnet_file_not_state_dict(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a torch file")

    with pytest.raises(MatchclipError, match=r"could not read ResNet weights from .*garbage\.pth"):
        build_resnet("resnet18", weights=path)
