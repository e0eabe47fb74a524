"""Notebook runner: discovery, profile choice, execution into reports/, input checks and committed notebooks."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from matchclip import notebooks, paths
from matchclip.classes import PREDICATE_CLASSES
from matchclip.config import resolve_config
from matchclip.demo import generate_demo_dataset
from matchclip.errors import MatchclipError
from matchclip.labels import load_labels
from matchclip.progress import progress_bar

COMMITTED = sorted((paths.project_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXPECTED_NAMES = ["00_data", "01_baselines", "02_main_results", "03_ablation", "04_attention_maps"]
ABSOLUTE_PATH = re.compile(r"(?<![\w<])(/(home|root|tmp|work|Users|var|mnt)/|[A-Za-z]:\\\\)")


@pytest.fixture
def project(tmp_path, monkeypatch):
    """An empty project folder that paths.project_root() points at."""
    monkeypatch.setenv("MATCHCLIP_HOME", str(tmp_path))
    monkeypatch.delenv("MATCHCLIP_REPORTS_DIR", raising=False)
    (tmp_path / "notebooks").mkdir()
    return tmp_path


def write_notebook(path, source: str) -> None:
    parameters = new_code_cell('profile = "demo"\nvalue = 1')
    parameters.metadata["tags"] = ["parameters"]
    notebook = new_notebook(
        cells=[parameters, new_code_cell(source)],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )
    nbformat.write(notebook, path)


def test_discover_committed_notebooks():
    assert [path.stem for path in notebooks.discover_notebooks()] == EXPECTED_NAMES


def test_discover_ignores_other_files(project):
    for name in ("01_b.ipynb", "00_a.ipynb", "scratch.ipynb", "00_a-Copy1.txt"):
        (project / "notebooks" / name).write_text("{}")
    assert [path.name for path in notebooks.discover_notebooks()] == ["00_a.ipynb", "01_b.ipynb"]


@pytest.mark.parametrize("name", ["02", "02_main_results", "02_main_results.ipynb"])
def test_discover_only_spellings(name):
    assert [path.stem for path in notebooks.discover_notebooks(only=[name])] == ["02_main_results"]


def test_discover_only_keeps_order():
    selected = notebooks.discover_notebooks(only=["03", "00_data", "03_ablation"])
    assert [path.stem for path in selected] == ["00_data", "03_ablation"]


def test_discover_only_unknown_lists_available():
    with pytest.raises(MatchclipError, match="available notebooks: 00_data, 01_baselines"):
        notebooks.discover_notebooks(only=["99_missing"])


def test_default_profile_demo_without_data(project):
    assert notebooks.default_profile() == "demo"


def test_default_profile_demo_without_images(project):
    labels = project / "data" / "psg" / "psg_cls_basic.json"
    labels.parent.mkdir(parents=True)
    labels.write_text("{}")
    assert notebooks.default_profile() == "demo"


def test_default_profile_paper_with_data(project):
    labels = project / "data" / "psg" / "psg_cls_basic.json"
    labels.parent.mkdir(parents=True)
    labels.write_text("{}")
    (project / "data" / "coco").mkdir()
    assert notebooks.default_profile() == "paper"


def test_check_inputs_passes_small_demo(project, small_data):
    notebooks.check_inputs([resolve_config("demo", small_data)])


def test_check_inputs_names_all_missing(project):
    with pytest.raises(MatchclipError) as error:
        notebooks.check_inputs([resolve_config("paper")])
    message = str(error.value)
    assert "psg_cls_basic.json not found" in message
    assert "data/README.md" in message
    assert "python -m matchclip data download" in message
    assert "nothing was trained" in message


@pytest.fixture
def small_data(tmp_path):
    labels = generate_demo_dataset(tmp_path / "small", seed=1, num_train=8, num_val=4, num_test=2)
    return {"labels": str(labels), "images": str(tmp_path / "small" / "coco")}


def test_check_inputs_missing_resnet_weights(project, small_data, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    config = resolve_config("demo", {**small_data, "model": "resnet", "resnet_weights": "imagenet"})
    with pytest.raises(MatchclipError, match="ImageNet weights of resnet18 not found"):
        notebooks.check_inputs([config])


def test_check_inputs_offline_clip_weights(project, small_data, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr("pathlib.Path.home", lambda: tmp_path)
    config = resolve_config("demo", {**small_data, "backbone": "ViT-B-16", "pretrained": "openai"})
    with pytest.raises(MatchclipError, match="ViT-B-16/openai are not in the local cache"):
        notebooks.check_inputs([config])


def test_merge_settings_drops_none():
    assert notebooks.merge_settings({"lr": 0.1, "epochs": 9}, epochs=3, seed=None) == {"lr": 0.1, "epochs": 3}


def test_parse_parameter_values():
    assert notebooks._parse_parameter("5") == 5
    assert notebooks._parse_parameter("null") is None
    assert notebooks._parse_parameter("paper") == "paper"


def small_labels(write_label_file):
    data = [
        {"image_id": "1", "file_name": "train2017/a.jpg", "relations": [6, 7]},
        {"image_id": "2", "file_name": "train2017/a.jpg", "relations": [6]},
        {"image_id": "3", "file_name": "train2017/c.jpg", "relations": [6, 8, 9]},
        {"image_id": "4", "file_name": "val2017/d.jpg", "relations": [7]},
        {"image_id": "5", "file_name": "val2017/e.jpg", "relations": []},
    ]
    payload = {
        "data": data,
        "predicate_classes": list(PREDICATE_CLASSES),
        "train_image_ids": ["1", "2", "3"],
        "val_image_ids": ["4"],
        "test_image_ids": ["5"],
    }
    return load_labels(write_label_file(payload))


def test_split_table_counts(write_label_file):
    table = notebooks.split_table(small_labels(write_label_file)).set_index("split")
    assert table.loc["train", "samples"] == 3
    assert table.loc["train", "image files"] == 2
    assert table.loc["train", "labels"] == 6
    assert table.loc["train", "labels per image (mean)"] == "2.00"
    assert table.loc["train", "labels per image (min-max)"] == "1-3"
    assert table.loc["test", "labels"] == "none (hidden)"


def test_imbalance_table(write_label_file):
    labels = small_labels(write_label_file)
    table = notebooks.imbalance_table(notebooks.class_count_table(labels)).set_index("split")
    assert table.loc["train", "most frequent"] == f"{PREDICATE_CLASSES[6]} (3)"
    assert table.loc["train", "imbalance ratio (max/min)"] == "3.0"
    assert table.loc["train", "scored classes with labels"] == "4 of 50"
    assert PREDICATE_CLASSES[6] in table.loc["val", "scored classes missing"]
    assert PREDICATE_CLASSES[7] not in table.loc["val", "scored classes missing"]


@pytest.mark.parametrize("path", COMMITTED, ids=[path.stem for path in COMMITTED])
def test_committed_notebook_is_clean(path):
    notebook = nbformat.read(path, as_version=4)
    tagged = [cell for cell in notebook.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1
    assert 'profile = "demo"' in tagged[0].source
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert "papermill" not in notebook.metadata
    text = json.dumps(notebook)
    assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text)
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            assert output["output_type"] != "error", f"{path.name}: a cell failed"
            assert output.get("name") != "stderr", output.get("text")


def test_run_notebooks_executes_into_reports(project):
    notebook = project / "notebooks" / "00_fake.ipynb"
    write_notebook(
        notebook,
        "import pandas as pd\n"
        "from matchclip import reports\n"
        "from matchclip.config import resolve_config\n"
        "config = resolve_config(profile)\n"
        "reports.write_table(pd.DataFrame({'value': [value]}), 'fake', caption='Fake',\n"
        "                    provenance=reports.provenance(config, source='00_fake'))\n"
        "print(profile, value)",
    )
    before = notebook.read_text()

    executed = notebooks.run_notebooks(profile="paper", parameters={"value": 7})

    assert executed == [project / "reports" / "executed" / "00_fake.ipynb"]
    assert notebook.read_text() == before
    outputs = nbformat.read(executed[0], as_version=4).cells[-1].outputs
    assert outputs[-1]["text"].strip() == "paper 7"
    assert (project / "reports" / "tables" / "fake.csv").read_text().split() == ["value", "7"]
    assert "### Table `fake`" in (project / "reports" / "README.md").read_text()


def test_cli_rejects_unknown_notebook(project):
    result = subprocess.run(
        [sys.executable, "-m", "matchclip.notebooks", "run", "--only", "07"],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert "no notebook named '07'" in result.stderr


def test_refresh_stores_outputs_in_place(project):
    notebook = project / "notebooks" / "00_fake.ipynb"
    write_notebook(notebook, "print(profile, value + 1)")

    refreshed = notebooks.refresh_notebooks()

    assert refreshed == [notebook]
    cells = nbformat.read(notebook, as_version=4).cells
    assert cells[-1].outputs[-1]["text"].strip() == "demo 2"
    assert "execution" not in cells[-1].metadata
    assert (project / "reports" / "README.md").is_file()


def test_run_notebooks_failure_names_cell_error(project):
    write_notebook(project / "notebooks" / "00_fail.ipynb", "raise ValueError('data missing: ' + profile)")
    with pytest.raises(MatchclipError, match="00_fail.ipynb failed with profile 'paper': ValueError: data missing: paper"):
        notebooks.run_notebooks(profile="paper")
    assert (project / "reports" / "executed" / "00_fail.ipynb").is_file()


def test_progress_bars_follow_tqdm_disable_after_import(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "0")
    assert not progress_bar(range(3), enabled=True).disable
    assert progress_bar(range(3), enabled=False).disable

    monkeypatch.setenv("TQDM_DISABLE", "1")
    bar = progress_bar(range(3), enabled=True)
    assert list(bar) == [0, 1, 2]
    assert bar.disable


def test_setup_notebook_turns_bars_off_unless_asked(monkeypatch):
    monkeypatch.setenv("TQDM_DISABLE", "")
    monkeypatch.delenv("TQDM_DISABLE")
    notebooks.setup_notebook()
    assert progress_bar(range(3)).disable

    monkeypatch.setenv("TQDM_DISABLE", "0")
    notebooks.setup_notebook()
    assert not progress_bar(range(3)).disable
