"""The command line: contract spellings, help text and an end-to-end demo run."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from matchclip.cli import main

SUBCOMMANDS = [
    ["data", "demo"],
    ["data", "check"],
    ["data", "download"],
    ["extract"],
    ["train"],
    ["evaluate"],
    ["predict"],
    ["submit"],
]


def run_cli(*args, check=True):
    completed = subprocess.run(
        [sys.executable, "-m", "matchclip", *map(str, args)],
        capture_output=True,
        text=True,
    )
    if check and completed.returncode != 0:
        raise AssertionError(f"exit {completed.returncode}\nstdout:\n{completed.stdout}\nstderr:\n{completed.stderr}")
    return completed


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_help_states_defaults(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "usage:" in text
    if command != ["data", "check"]:
        assert "default" in text


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """Demo data and a short trained run made through the command line."""
    root = tmp_path_factory.mktemp("cli")
    data = root / "data"
    run_cli("data", "demo", "--out", data, "--num-train", 160, "--num-val", 48, "--num-test", 500)
    run_cli("data", "check", "--labels", data / "psg_cls_basic.json", "--images", data / "coco")
    completed = run_cli(
        "train", "--profile", "demo",
        "--labels", data / "psg_cls_basic.json", "--images", data / "coco", "--out", root / "run",
        "--cache-dir", root / "cache", "--epochs", 2, "--hidden", 32, "--mlp", 64, "--heads", 2,
    )
    return {"root": root, "data": data, "run": root / "run", "train_output": completed.stdout}


def test_train_prints_best_val_score(demo_run):
    match = re.search(r"best val mean_recall@3: (\d\.\d{4})", demo_run["train_output"])
    assert match is not None, demo_run["train_output"]
    assert 0.0 <= float(match.group(1)) <= 1.0


def test_evaluate_prints_both_conventions(demo_run):
    output = run_cli("evaluate", "--run", demo_run["run"], "--per-class").stdout
    assert "val mean_recall@3:" in output
    assert "val mean_recall@3_present:" in output
    assert "predicate" in output


def test_predict_lists_three_relations(demo_run):
    image = next((demo_run["data"] / "coco" / "val2017").glob("*.jpg"))
    output = run_cli("predict", "--run", demo_run["run"], image).stdout
    line = output.strip().splitlines()[-1]
    assert line.startswith(str(image))
    assert len(re.findall(r"\(\d\.\d{3}\)", line)) == 3


def test_submit_writes_then_checks(demo_run):
    result = demo_run["root"] / "result.txt"
    run_cli("submit", "--run", demo_run["run"], "--out", result)
    lines = result.read_text().splitlines()
    assert len(lines) == 500
    assert all(len(set(line.split())) == 3 for line in lines)
    output = run_cli("submit", "--check", result).stdout
    assert output.startswith("OK")


def test_submit_check_names_bad_line(tmp_path):
    bad = tmp_path / "result.txt"
    bad.write_text("6 7 8\n" * 10 + "6 7\n" + "6 7 8\n" * 489)
    completed = run_cli("submit", "--check", bad, check=False)
    assert completed.returncode == 2
    assert "line 11" in completed.stderr


def test_data_check_reports_missing_images(tmp_path, demo_run):
    completed = run_cli(
        "data", "check", "--labels", demo_run["data"] / "psg_cls_basic.json", "--images", tmp_path, check=False
    )
    assert completed.returncode == 2
    assert "missing" in completed.stderr


def test_unknown_profile_is_an_error(tmp_path):
    completed = run_cli("train", "--profile", "nope", "--out", tmp_path, check=False)
    assert completed.returncode == 2
    assert "unknown profile" in completed.stderr


@pytest.mark.shared_data
def test_predict_labels_real_coco_images(demo_run, shared_data):
    images = sorted((shared_data / "coco" / "val2017").glob("*.jpg"))
    assert len(images) == 3
    output = run_cli("predict", "--run", demo_run["run"], *images).stdout
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 3
    for image, line in zip(images, lines):
        assert line.startswith(str(image))
        assert len(re.findall(r"\(\d\.\d{3}\)", line)) == 3


@pytest.mark.shared_data
def test_real_sample_submission_passes_check(shared_data):
    output = run_cli("submit", "--check", shared_data / "psg" / "examples" / "sample_submission_500x3.txt").stdout
    assert "500 lines" in output
