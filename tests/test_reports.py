"""Report writing: tables, figures, provenance, atomic writes and the README."""

from __future__ import annotations

import json
import os
import subprocess

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from matchclip import reports
from matchclip.config import resolve_config
from matchclip.errors import WriteError


@pytest.fixture
def demo_config():
    return resolve_config("demo", {"seed": 3})


@pytest.fixture
def frame():
    return pd.DataFrame({"Model": ["A|B", "C"], "score": ["27.40 (-1.12)", None]})


def make_provenance(config, source="01_baselines"):
    return reports.provenance(config, source=source, settings={"epochs": 2, "seed": None}, date="2024-01-01 00:00 UTC")


def test_output_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(reports.REPORTS_DIR_VARIABLE, str(tmp_path / "elsewhere"))
    assert reports.output_dir() == (tmp_path / "elsewhere").resolve()


def test_caption_demo_adds_note(demo_config):
    text = reports.caption("Table 2: main results", demo_config)
    assert text.endswith(f"({reports.DEMO_NOTE}.)")


def test_caption_paper_unchanged():
    config = resolve_config("paper")
    assert reports.caption("Table 2: main results", config) == "Table 2: main results"


def test_provenance_fields(demo_config):
    provenance = make_provenance(demo_config)
    assert provenance.profile == "demo"
    assert provenance.data == "data/demo/psg_cls_basic.json"
    assert provenance.backbone == "matchclip-tiny-vit32 (random init, seed 3)"
    assert provenance.seed == 3
    assert provenance.settings == {"epochs": 2}
    assert provenance.commit


def test_relative_to_project_outside_path(tmp_path):
    assert reports.relative_to_project(tmp_path / "x.json") == str(tmp_path / "x.json")


def test_git_commit_outside_repository(tmp_path):
    assert reports.git_commit(tmp_path) == "unknown"


def test_markdown_table_escapes_pipes(frame):
    lines = reports.markdown_table(frame).splitlines()
    assert lines[0] == "| Model | score |"
    assert lines[2] == "| A\\|B | 27.40 (-1.12) |"
    assert lines[3] == "| C |  |"


def test_write_table_files(tmp_path, frame, demo_config):
    written = reports.write_table(
        frame, "table_x", caption="Caption X", provenance=make_provenance(demo_config), out_dir=tmp_path
    )
    assert pd.read_csv(written["csv"]).shape == (2, 2)
    assert written["markdown"].read_text().startswith("**Caption X**")
    meta = json.loads(written["meta"].read_text())
    assert meta["provenance"]["source"] == "01_baselines"
    assert meta["files"]["csv"] == "tables/table_x.csv"


def test_write_table_failure_keeps_old(tmp_path, frame, demo_config, monkeypatch):
    provenance = make_provenance(demo_config)
    reports.write_table(frame, "table_x", caption="old", provenance=provenance, out_dir=tmp_path)
    before = (tmp_path / "tables" / "table_x.md").read_text()

    def fail_replace(source, target):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail_replace)
    with pytest.raises(WriteError):
        reports.write_table(frame, "table_x", caption="new", provenance=provenance, out_dir=tmp_path)
    assert (tmp_path / "tables" / "table_x.md").read_text() == before
    assert not list((tmp_path / "tables").glob(".*.tmp"))


def test_write_table_rejects_path_name(tmp_path, frame, demo_config):
    with pytest.raises(ValueError):
        reports.write_table(frame, "../x", caption="c", provenance=make_provenance(demo_config), out_dir=tmp_path)


def test_save_figure_png(tmp_path, demo_config):
    figure, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    png = reports.save_figure(figure, "fig_x", caption="A line", provenance=make_provenance(demo_config), out_dir=tmp_path)
    plt.close(figure)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "figures" / "fig_x.json").read_text())["caption"] == "A line"


def test_readme_lists_everything(tmp_path, frame, demo_config):
    reports.write_table(frame, "table_b", caption="Table B", provenance=make_provenance(demo_config, "02_main"), out_dir=tmp_path)
    reports.write_table(frame, "table_a", caption="Table A", provenance=make_provenance(demo_config, "00_data"), out_dir=tmp_path)
    figure, _ = plt.subplots()
    reports.save_figure(figure, "fig_a", caption="Figure A", provenance=make_provenance(demo_config, "00_data"), out_dir=tmp_path)
    plt.close(figure)

    text = reports.write_readme(tmp_path).read_text()
    assert text.index("## 00_data") < text.index("## 02_main")
    assert text.index("### Table `table_a`") < text.index("### Figure `fig_a`")
    assert "![fig_a](figures/fig_a.png)" in text
    assert "| A\\|B | 27.40 (-1.12) |" in text
    assert "profile `demo`" in text
    assert "commit `" in text
    assert "date 2024-01-01 00:00 UTC" in text


def test_readme_rewrite_drops_deleted(tmp_path, frame, demo_config):
    reports.write_table(frame, "table_a", caption="Table A", provenance=make_provenance(demo_config), out_dir=tmp_path)
    reports.write_readme(tmp_path)
    for path in (tmp_path / "tables").glob("table_a.*"):
        path.unlink()
    assert "table_a" not in reports.write_readme(tmp_path).read_text()


def test_readme_skips_broken_sidecar(tmp_path, frame, demo_config):
    reports.write_table(frame, "table_a", caption="Table A", provenance=make_provenance(demo_config), out_dir=tmp_path)
    (tmp_path / "tables" / "broken.json").write_text("{not json")
    assert "### Table `table_a`" in reports.write_readme(tmp_path).read_text()


def test_readme_empty_folder(tmp_path):
    assert "No tables or figures yet" in reports.write_readme(tmp_path).read_text()


def test_git_commit_ignores_rewritten_reports(tmp_path):
    def git(*arguments):
        subprocess.run(["git", "-C", str(tmp_path), *arguments], check=True, capture_output=True)

    git("init", "-q")
    git("config", "user.email", "test@example.com")
    git("config", "user.name", "test")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "table.md").write_text("old\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("commit", "-q", "-m", "first")
    clean = reports.git_commit(tmp_path)

    (tmp_path / "reports" / "table.md").write_text("new\n")
    assert reports.git_commit(tmp_path) == clean

    (tmp_path / "code.py").write_text("x = 2\n")
    assert reports.git_commit(tmp_path) == clean + "+dirty"
