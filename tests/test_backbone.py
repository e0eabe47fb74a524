"""Frozen open_clip backbones: weight sources, token shapes, preprocessing and prompts."""

from __future__ import annotations

import hashlib
import json
import threading

import numpy as np
import open_clip
import pytest
import torch
from open_clip.transformer import QuickGELU
from PIL import Image

from matchclip.backbone import (
    MODEL_CONFIG_DIR,
    TINY_MODEL,
    load_backbone,
    register_model_configs,
    save_backbone,
)
from matchclip.errors import MatchclipError

TEXT_CONFIG = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}

# Small architectures that differ in patch grid, widths and tower type.
TEST_CONFIGS = {
    "matchclip-test-vit-p32": {
        "embed_dim": 24,
        "vision_cfg": {"image_size": 64, "patch_size": 32, "width": 32, "layers": 1, "head_width": 16},
        "text_cfg": TEXT_CONFIG,
    },
    "matchclip-test-vit-p16": {
        "embed_dim": 40,
        "vision_cfg": {"image_size": 64, "patch_size": 16, "width": 48, "layers": 2, "head_width": 16},
        "text_cfg": TEXT_CONFIG,
    },
    "matchclip-test-resnet": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64},
        "text_cfg": TEXT_CONFIG,
    },
    "matchclip-test-attnpool": {
        "embed_dim": 32,
        "vision_cfg": {
            "image_size": 64,
            "patch_size": 32,
            "width": 32,
            "layers": 1,
            "head_width": 16,
            "attentional_pool": True,
            "attn_pooler_heads": 2,
        },
        "text_cfg": TEXT_CONFIG,
    },
}
VIT_CONFIGS = ("matchclip-test-vit-p32", "matchclip-test-vit-p16")


@pytest.fixture(scope="module", autouse=True)
def test_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model_configs")
    for name, config in TEST_CONFIGS.items():
        (folder / f"{name}.json").write_text(json.dumps(config), encoding="utf-8")
    register_model_configs(folder)
    return folder


@pytest.fixture(scope="module")
def vit():
    return load_backbone("matchclip-test-vit-p16", seed=0)


def random_images(count: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(count, 3, size, size, generator=generator)


def test_tiny_model_registered():
    assert TINY_MODEL in open_clip.list_models()


def test_tiny_model_shapes_follow_config():
    config = json.loads((MODEL_CONFIG_DIR / f"{TINY_MODEL}.json").read_text(encoding="utf-8"))
    vision = config["vision_cfg"]
    grid = vision["image_size"] // vision["patch_size"]

    backbone = load_backbone(TINY_MODEL)

    assert backbone.grid_size == (grid, grid)
    assert backbone.num_tokens == 1 + grid * grid
    assert backbone.token_width == vision["width"]
    assert backbone.embed_dim == config["embed_dim"]
    assert backbone.preprocess_config["size"] == [vision["image_size"]] * 2


@pytest.mark.parametrize("name", VIT_CONFIGS)
def test_vit_shapes_read_from_model(name):
    vision = TEST_CONFIGS[name]["vision_cfg"]
    grid = vision["image_size"] // vision["patch_size"]

    backbone = load_backbone(name)
    tokens, embeddings = backbone.encode_images(random_images(3, vision["image_size"]))

    assert backbone.grid_size == (grid, grid)
    assert backbone.num_prefix_tokens == 1
    assert backbone.num_tokens == 1 + grid * grid
    assert backbone.token_width == vision["width"]
    assert backbone.embed_dim == TEST_CONFIGS[name]["embed_dim"]
    assert tuple(tokens.shape) == (3, backbone.num_tokens, backbone.token_width)
    assert tuple(embeddings.shape) == (3, backbone.embed_dim)
    assert tokens.dtype == torch.float32
    assert embeddings.dtype == torch.float32


def test_tokens_are_final_layernorm_output(vit):
    images = random_images(2, 64)

    tokens, embeddings = vit.encode_images(images)
    reference = vit.model.visual.forward_intermediates(
        images,
        indices=1,
        normalize_intermediates=True,
        output_fmt="NLC",
        output_extra_tokens=True,
    )

    torch.testing.assert_close(tokens[:, 1:], reference["image_intermediates"][-1])
    torch.testing.assert_close(tokens[:, :1], reference["image_intermediates_prefix"][-1])
    torch.testing.assert_close(embeddings, reference["image_features"])
    # The pooled embedding is the projected class token, so tokens are taken before the projection.
    torch.testing.assert_close(tokens[:, 0] @ vit.model.visual.proj, embeddings)


def test_embeddings_match_open_clip_encode_image(vit):
    images = random_images(2, 64, seed=3)

    _, embeddings = vit.encode_images(images)

    torch.testing.assert_close(embeddings, vit.model.encode_image(images))


def test_backbone_frozen_and_eval(vit):
    vit.train()

    assert all(not parameter.requires_grad for parameter in vit.parameters())
    assert not vit.training
    assert not any(module.training for module in vit.modules())


def test_random_weights_reproducible():
    images = random_images(2, 64)

    first, _ = load_backbone("matchclip-test-vit-p32", seed=5).encode_images(images)
    second, _ = load_backbone("matchclip-test-vit-p32", seed=5).encode_images(images)
    other, _ = load_backbone("matchclip-test-vit-p32", seed=6).encode_images(images)

    assert torch.equal(first, second)
    assert not torch.allclose(first, other)


def test_random_weights_leave_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)

    torch.manual_seed(123)
    load_backbone("matchclip-test-vit-p32", seed=0)
    after = torch.rand(3)

    assert torch.equal(after, expected)


def test_fingerprint_names_random_weights(vit):
    fingerprint = vit.fingerprint()

    assert fingerprint["model"] == "matchclip-test-vit-p16"
    assert fingerprint["weights"] == "random:seed=0"
    assert fingerprint["preprocess"] == vit.preprocess_config
    json.dumps(fingerprint)


def test_checkpoint_file_roundtrip(vit, tmp_path):
    checkpoint = tmp_path / "weights.pt"
    torch.save(vit.model.state_dict(), checkpoint)
    images = random_images(2, 64, seed=1)

    loaded = load_backbone("matchclip-test-vit-p16", str(checkpoint), seed=99)
    tokens, embeddings = loaded.encode_images(images)
    expected_tokens, expected_embeddings = vit.encode_images(images)

    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(embeddings, expected_embeddings)
    assert torch.equal(loaded.encode_prompts(["riding"]), vit.encode_prompts(["riding"]))
    assert loaded.fingerprint()["weights"] == "sha256:" + hashlib.sha256(checkpoint.read_bytes()).hexdigest()


def test_local_dir_roundtrip(vit, tmp_path):
    folder = save_backbone(vit, tmp_path / "saved")
    images = random_images(2, 64, seed=2)
    expected_tokens, expected_embeddings = vit.encode_images(images)

    for loaded in (
        load_backbone("matchclip-test-vit-p16", f"local-dir:{folder}"),
        load_backbone(f"local-dir:{folder}"),
    ):
        tokens, embeddings = loaded.encode_images(images)
        assert torch.equal(tokens, expected_tokens)
        assert torch.equal(embeddings, expected_embeddings)
        assert loaded.num_tokens == vit.num_tokens
        assert loaded.fingerprint()["weights"].startswith("sha256:")


def test_local_dir_fingerprint_independent_of_location(vit, tmp_path):
    first = save_backbone(vit, tmp_path / "one")
    second = save_backbone(vit, tmp_path / "two")

    assert load_backbone(f"local-dir:{first}").fingerprint() == load_backbone(f"local-dir:{second}").fingerprint()


def test_local_dir_without_weights_rejected(vit, tmp_path):
    folder = save_backbone(vit, tmp_path / "saved")
    (folder / "open_clip_model.safetensors").unlink()

    with pytest.raises(MatchclipError, match="no weights file"):
        load_backbone(f"local-dir:{folder}")


def test_local_dir_without_config_rejected(tmp_path):
    with pytest.raises(MatchclipError, match="open_clip_config.json not found"):
        load_backbone("matchclip-test-vit-p16", f"local-dir:{tmp_path}")


def test_preprocess_config_from_model(vit, tmp_path):
    folder = save_backbone(vit, tmp_path / "saved")
    config_path = folder / "open_clip_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["preprocess_cfg"].update(mean=[0.25, 0.5, 0.75], std=[0.5, 0.25, 0.125], resize_mode="squash")
    config_path.write_text(json.dumps(config), encoding="utf-8")

    backbone = load_backbone(f"local-dir:{folder}")
    pixels = backbone.preprocess(Image.new("RGB", (50, 30), (255, 0, 128)))
    expected = (torch.tensor([1.0, 0.0, 128 / 255]) - torch.tensor([0.25, 0.5, 0.75])) / torch.tensor(
        [0.5, 0.25, 0.125]
    )

    assert backbone.preprocess_config["mean"] == [0.25, 0.5, 0.75]
    assert backbone.preprocess_config["std"] == [0.5, 0.25, 0.125]
    assert tuple(pixels.shape) == (3, 64, 64)
    torch.testing.assert_close(pixels[:, 32, 32], expected)
    assert backbone.fingerprint()["preprocess"] != vit.fingerprint()["preprocess"]


def test_openai_tag_offline_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    with pytest.raises(MatchclipError) as caught:
        load_backbone("ViT-B-32", "openai", cache_dir=tmp_path)

    message = str(caught.value)
    assert "'openai'" in message
    assert "ViT-B-32" in message
    assert "HF_HUB_OFFLINE" in message
    assert "local-dir:" in message


def test_tag_from_local_file_uses_quick_gelu(vit, monkeypatch, tmp_path):
    # The "openai" tag of a test model points at a local file, like a cached download.
    checkpoint = tmp_path / "weights.pt"
    torch.save(vit.model.state_dict(), checkpoint)
    tag_config = {"file": str(checkpoint), "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    real_get_pretrained_cfg = open_clip.get_pretrained_cfg

    def get_pretrained_cfg(model: str, tag: str) -> dict:
        if (model, tag) == ("matchclip-test-vit-p16", "openai"):
            return tag_config
        return real_get_pretrained_cfg(model, tag)

    monkeypatch.setattr(open_clip, "get_pretrained_cfg", get_pretrained_cfg)

    backbone = load_backbone("matchclip-test-vit-p16", "openai")

    assert any(isinstance(module, QuickGELU) for module in backbone.modules())
    assert not any(isinstance(module, QuickGELU) for module in vit.modules())
    assert backbone.preprocess_config["mean"] == [0.5, 0.5, 0.5]
    assert backbone.fingerprint()["weights"] == "openai"
    assert backbone.model_config["quick_gelu"] is True


def test_unknown_tag_lists_tags():
    with pytest.raises(MatchclipError, match="known open_clip tag.*openai"):
        load_backbone("ViT-B-32", "no-such-tag")


def test_unknown_model_rejected():
    with pytest.raises(MatchclipError, match="unknown open_clip model 'ViT-Z-99'"):
        load_backbone("ViT-Z-99")


def test_attentional_pool_tower_rejected():
    with pytest.raises(MatchclipError, match="attentional pooling"):
        load_backbone("matchclip-test-attnpool")


def test_resnet_tokens_flatten_last_feature_map():
    backbone = load_backbone("matchclip-test-resnet")
    vision = TEST_CONFIGS["matchclip-test-resnet"]["vision_cfg"]

    tokens, embeddings = backbone.encode_images(random_images(2, vision["image_size"]))
    height, width = backbone.grid_size

    assert backbone.token_width == vision["width"] * 32
    assert backbone.num_tokens == 1 + height * width
    assert tuple(tokens.shape) == (2, backbone.num_tokens, backbone.token_width)
    assert tuple(embeddings.shape) == (2, TEST_CONFIGS["matchclip-test-resnet"]["embed_dim"])
    torch.testing.assert_close(tokens[:, 0], tokens[:, 1:].mean(dim=1))


def test_rgb_image_to_tokens(vit):
    generator = np.random.default_rng(0)
    image = Image.fromarray(generator.integers(0, 256, size=(45, 80, 3), dtype=np.uint8), mode="RGB")

    tokens, embeddings = vit.encode_images([image])
    expected_tokens, expected_embeddings = vit.encode_images(vit.preprocess(image).unsqueeze(0))

    assert tuple(tokens.shape) == (1, vit.num_tokens, vit.token_width)
    assert torch.equal(tokens, expected_tokens)
    assert torch.equal(embeddings, expected_embeddings)
    assert torch.isfinite(tokens).all()


def test_encode_images_thread_safe(vit):
    batches = {0: random_images(2, 64, seed=10), 1: random_images(3, 64, seed=11)}
    expected = {index: vit.encode_images(images)[0] for index, images in batches.items()}
    mismatches: list[int] = []
    start = threading.Barrier(2)

    def encode_repeatedly(index: int) -> None:
        start.wait()
        for _ in range(20):
            tokens, _ = vit.encode_images(batches[index])
            if tokens.shape != expected[index].shape or not torch.allclose(tokens, expected[index], atol=1e-5):
                mismatches.append(index)

    threads = [threading.Thread(target=encode_repeatedly, args=(index,)) for index in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert mismatches == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_encoding_matches_cpu(vit):
    images = random_images(2, 64, seed=4)
    on_cuda = load_backbone("matchclip-test-vit-p16", seed=0, device="cuda")

    tokens, embeddings = on_cuda.encode_images(images)
    expected_tokens, expected_embeddings = vit.encode_images(images)

    assert tokens.device.type == "cuda"
    assert tokens.dtype == torch.float32
    # float16 autocast on CUDA against float32 on the CPU.
    torch.testing.assert_close(tokens.cpu(), expected_tokens, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(embeddings.cpu(), expected_embeddings, rtol=2e-2, atol=2e-2)


def test_encode_images_rejects_bad_shape(vit):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        vit.encode_images(torch.zeros(3, 64, 64))


def test_prompts_match_open_clip_text_encoder(vit):
    names = ["riding", "sitting on", "looking at"]
    template = "One relation in the photo is {}."

    embeddings = vit.encode_prompts(names, template)
    tokenizer = open_clip.get_tokenizer("matchclip-test-vit-p16")
    expected = vit.model.encode_text(tokenizer([template.format(name) for name in names]))

    assert tuple(embeddings.shape) == (3, vit.embed_dim)
    torch.testing.assert_close(embeddings, expected)


def test_prompts_depend_on_template(vit):
    first = vit.encode_prompts(["riding"], "One relation in the photo is {}.")
    second = vit.encode_prompts(["riding"], "a photo of {}")

    assert not torch.allclose(first, second)


def test_prompt_template_needs_placeholder(vit):
    with pytest.raises(ValueError, match="placeholder"):
        vit.encode_prompts(["riding"], "no placeholder")
