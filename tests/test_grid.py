"""Grid rows of the report's tables, their configurations, delta formatting and Table 1."""

from __future__ import annotations

import logging

import pytest

from matchclip import grid, published
from matchclip.config import resolve_config
from matchclip.demo import generate_demo_dataset
from matchclip.errors import ConfigError

IDENTITY_IGNORED = ("profile",)


def settings(config) -> dict:
    return {key: value for key, value in config.to_dict().items() if key not in IDENTITY_IGNORED}


def changed_keys(config, reference) -> set[str]:
    ours, theirs = settings(config), settings(reference)
    return {key for key in ours if ours[key] != theirs[key]}


def fake_result(row, config, score):
    return grid.RowResult(
        row=row,
        config=config,
        run_dir="runs/x",
        best_epoch=4,
        metrics={"mean_recall@3": score / 100, "mean_recall@3_present": score / 100},
    )


@pytest.mark.parametrize(
    ("key", "printed"),
    [
        ("large-depth", "27.40 (-1.12)"),
        ("large-matching", "27.95 (-0.57)"),
        ("large-cls", "26.69 (-1.83)"),
        ("large-balanced", "31.90 (+3.38)"),
        ("huge", "30.71 (+2.19)"),
        ("huge-balanced", "33.21 (+4.69)"),
    ],
)
def test_format_delta_table3_strings(key, printed):
    assert grid.format_delta(published.TABLE3[key], published.TABLE3["large"]) == printed


def test_format_delta_table4_strings():
    assert grid.format_delta(published.TABLE4["large-balanced-no-text"], published.TABLE4["large-balanced"]) == "31.73 (-0.17)"
    assert grid.format_delta(published.TABLE4["huge-balanced-no-text"], published.TABLE4["huge-balanced"]) == "33.06 (-0.15)"


def test_format_delta_uses_printed_values():
    # 10.006 and 10.004 print as 10.01 and 10.00, so the printed delta is +0.01, not +0.00.
    assert grid.format_delta(10.006, 10.004) == "10.01 (+0.01)"


def test_format_delta_without_reference():
    assert grid.format_delta(28.5234, None) == "28.52"
    assert grid.format_delta(None, 28.52) == ""


def test_variant_family_by_profile():
    assert grid.variant_family("demo") == "scaled"
    assert grid.variant_family("paper") == "published"


def test_variant_unknown_raises():
    with pytest.raises(KeyError):
        grid.variant_overrides("demo", "giant")


def test_scaled_variants_grow():
    base = resolve_config("demo", grid.variant_overrides("demo", "base"))
    large = resolve_config("demo", grid.variant_overrides("demo", "large"))
    huge = resolve_config("demo", grid.variant_overrides("demo", "huge"))
    assert base.hidden < large.hidden < huge.hidden
    assert huge.hidden == round(large.hidden * grid.HUGE_WIDTH_RATIO)
    # The scaled variants differ in width only; dropout stays the profile's.
    assert huge.dropout == large.dropout == base.dropout == resolve_config("demo").dropout


def test_published_variants_use_presets():
    large = resolve_config("paper", grid.variant_overrides("paper", "large"))
    base = resolve_config("paper", grid.variant_overrides("paper", "base"))
    assert (large.backbone, large.hidden) == ("ViT-L-14-336", 1024)
    assert (base.backbone, base.hidden) == ("ViT-B-16", 512)


@pytest.mark.parametrize("profile", ["demo", "paper"])
def test_ablation_rows_change_one_thing(profile):
    rows = {row.key: row for row in grid.ablation_rows(profile)}
    configs = {key: grid.resolve_row(row, profile=profile) for key, row in rows.items()}
    reference = configs["large"]
    assert changed_keys(configs["large-depth"], reference) == {"fusion_depth", "readout_depth"}
    assert configs["large-depth"].fusion_depth == reference.fusion_depth + 1
    assert changed_keys(configs["large-matching"], reference) == {"matching_blocks"}
    assert configs["large-cls"].cls_tokens == 5
    assert changed_keys(configs["large-balanced"], reference) == {"balanced", "batch_size"}
    assert configs["large-balanced"].batch_size == grid.BALANCED_BATCH_SIZE
    assert all(row.reference == "large" for key, row in rows.items() if key != "large")


def test_ablation_hidden_parameter():
    rows = {row.key: row for row in grid.ablation_rows("demo", hidden=1600, wide_hidden=2000)}
    assert grid.resolve_row(rows["large"], profile="demo").hidden == 1600
    assert grid.resolve_row(rows["large-cls"], profile="demo").hidden == 1600
    assert grid.resolve_row(rows["huge"], profile="demo").hidden == 2000


@pytest.mark.parametrize("key", ["large-balanced", "huge-balanced"])
def test_shared_rows_identical_across_tables(key):
    tables = [grid.main_rows("demo"), grid.ablation_rows("demo"), grid.relation_token_rows("demo")]
    configs = [grid.resolve_row(next(r for r in rows if r.key == key), profile="demo") for rows in tables]
    assert configs[0].to_dict() == configs[1].to_dict()
    assert configs[0].to_dict() == configs[2].to_dict()


def test_relation_token_rows_drop_text():
    rows = {row.key: row for row in grid.relation_token_rows("demo")}
    no_text = grid.resolve_row(rows["large-balanced-no-text"], profile="demo")
    with_text = grid.resolve_row(rows["large-balanced"], profile="demo")
    assert changed_keys(no_text, with_text) == {"relation_tokens"}
    assert rows["huge-balanced-no-text"].reference == "huge-balanced"


def test_baseline_rows_settings():
    rows = {row.key: row for row in grid.baseline_rows("paper")}
    resnet = grid.resolve_row(rows["resnet"], profile="paper")
    assert (resnet.model, resnet.optimizer, resnet.momentum, resnet.lr) == ("resnet", "sgd", 0.9, 2.5e-4)
    assert (resnet.resnet_arch, resnet.resnet_weights) == ("resnet50", "imagenet")
    probe = grid.resolve_row(rows["linear_probe"], profile="paper")
    assert (probe.model, probe.backbone) == ("linear_probe", "ViT-B-16")
    demo_resnet = grid.resolve_row(grid.baseline_rows("demo")[0], profile="demo")
    assert (demo_resnet.resnet_arch, demo_resnet.resnet_weights) == ("resnet18", None)


def test_published_numbers_attached():
    rows = {row.key: row for row in grid.main_rows("demo") + grid.baseline_rows("demo")}
    assert (rows["huge-balanced"].published_eval, rows["huge-balanced"].published_test) == (33.21, 34.60)
    assert rows["zero_shot"].published_eval is None


def test_resolve_row_precedence(caplog):
    row = next(r for r in grid.main_rows("demo") if r.key == "large-balanced")
    with caplog.at_level(logging.WARNING, logger="matchclip.grid"):
        config = grid.resolve_row(row, profile="demo", overrides={"epochs": 3, "batch_size": 16, "seed": None})
    assert config.epochs == 3
    assert config.batch_size == grid.BALANCED_BATCH_SIZE
    assert config.seed == resolve_config("demo").seed
    assert "keeps its own batch_size=64" in caplog.text


def test_resolve_row_defaults_yield():
    row = grid.GridRow(key="cheap", label="cheap", overrides={}, defaults={"epochs": 2})
    assert grid.resolve_row(row, profile="demo").epochs == 2
    assert grid.resolve_row(row, profile="demo", overrides={"epochs": 5}).epochs == 5


def test_ablation_table_deltas():
    rows = grid.ablation_rows("demo")
    scores = {"large": 20.0, "large-depth": 18.5, "large-matching": 21.0, "large-cls": 20.0,
              "large-balanced": 25.556, "huge": 19.0, "huge-balanced": 26.0}
    results = {row.key: fake_result(row, grid.resolve_row(row, profile="demo"), scores[row.key]) for row in rows}
    table = grid.ablation_table(results, rows).set_index(grid.ablation_table(results, rows).index)
    ours = dict(zip([row.key for row in rows], table["mR@3 val (ours)"]))
    assert ours["large"] == "20.00"
    assert ours["large-depth"] == "18.50 (-1.50)"
    assert ours["large-balanced"] == "25.56 (+5.56)"
    theirs = dict(zip([row.key for row in rows], table["mR@3 eval (published)"]))
    assert theirs["large-depth"] == "27.40 (-1.12)"
    balance = dict(zip([row.key for row in rows], table["Data balance"]))
    assert (balance["large"], balance["large-balanced"]) == (grid.NOT_USED, grid.CHECK)


def test_relation_token_table_references():
    rows = grid.relation_token_rows("demo")
    scores = {"large-balanced": 30.0, "large-balanced-no-text": 29.0, "huge-balanced": 31.0, "huge-balanced-no-text": 31.5}
    results = {row.key: fake_result(row, grid.resolve_row(row, profile="demo"), scores[row.key]) for row in rows}
    table = grid.relation_token_table(results, rows)
    assert list(table["mR@3 val (ours)"]) == ["30.00", "29.00 (-1.00)", "31.00", "31.50 (+0.50)"]
    assert list(table["Text encoder"]) == [grid.CHECK, grid.NOT_USED, grid.CHECK, grid.NOT_USED]


def test_results_table_published_columns():
    rows = grid.baseline_rows("demo")
    results = {row.key: fake_result(row, grid.resolve_row(row, profile="demo"), 12.345) for row in rows}
    table = grid.results_table(results, rows)
    assert list(table["mR@3 eval (published)"]) == ["15.49", "23.03", "n/a"]
    assert list(table["mR@3 val (ours)"]) == ["12.35", "12.35", "12.35"]
    assert list(table["Best epoch"]) == [5, 5, 5]


def test_backbone_shape_vit():
    shape = grid.backbone_shape("ViT-L-14-336")
    assert (shape.image_width, shape.text_width, shape.image_size, shape.patch_size) == (1024, 768, 336, 14)


def test_backbone_shape_resnet_tower():
    shape = grid.backbone_shape("RN50")
    assert (shape.image_width, shape.text_width, shape.patch_size) == (2048, 1024, None)


def test_backbone_shape_unknown():
    with pytest.raises(ConfigError):
        grid.backbone_shape("no-such-model")


def test_format_count():
    assert [grid.format_count(n) for n in (950, 28_728, 14_619_704)] == ["950", "28.7K", "14.6M"]


def test_variant_table_paper():
    table = grid.variant_table("paper").set_index("Model")
    assert table.loc["MatchCLIP-Large", "Image size"] == "336"
    assert table.loc["MatchCLIP-Large", "Patch size"] == "14"
    assert table.loc["MatchCLIP-Huge", "Hidden size D"] == "1600"
    assert table.loc["MatchCLIP-Huge", "Params (published)"] == "186M"
    assert table.loc["Linear probe CLIP-B/16", "Params (ours)"] == "28.7K"


def test_variant_table_demo_counts_built_model():
    from matchclip.model import MatchCLIP, count_parameters

    config = resolve_config("demo", grid.variant_overrides("demo", "large"))
    shape = grid.backbone_shape(config.backbone)
    model = MatchCLIP(
        image_width=shape.image_width, text_width=shape.text_width, hidden=config.hidden, mlp=config.mlp,
        heads=config.heads, fusion_depth=config.fusion_depth, readout_depth=config.readout_depth,
    )
    table = grid.variant_table("demo").set_index("Model")
    assert table.loc["MatchCLIP-Large", "Params (ours)"] == grid.format_count(count_parameters(model))


@pytest.mark.slow
def test_run_rows_reuses_identical_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("MATCHCLIP_HOME", str(tmp_path))
    labels = generate_demo_dataset(tmp_path / "small", seed=1, num_train=96, num_val=32, num_test=8)
    overrides = {
        "labels": str(labels), "images": str(tmp_path / "small" / "coco"), "cache_dir": str(tmp_path / "cache"),
        "epochs": 1, "warmup_epochs": 0,
    }
    row = grid.GridRow(key="probe", label="probe", overrides={"model": "linear_probe"})
    twin = grid.GridRow(key="probe-again", label="probe again", overrides={"model": "linear_probe"})
    results = grid.run_rows([row, twin], profile="demo", overrides=overrides)
    assert results["probe"].run_dir == results["probe-again"].run_dir
    assert results["probe"].run_dir.parent == tmp_path / "runs"
    assert 0.0 <= results["probe"].score <= 100.0


def test_profile_width_scales_report_units():
    assert grid.profile_width("paper", 1600) == 1600
    assert grid.profile_width("demo", 1600) == 100
    assert grid.profile_width("demo", 1024) == resolve_config("demo").hidden
    assert grid.profile_width("demo", 512) == grid.SCALED_VARIANTS["base"]["hidden"]
    assert grid.profile_width("demo", 1600) == grid.SCALED_VARIANTS["huge"]["hidden"]


def test_profile_width_rejects_nonpositive():
    with pytest.raises(ValueError, match="head width must be a positive number of channels, got 0"):
        grid.profile_width("demo", 0)
