"""Label file loading, validation and dataset checks."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from matchclip.classes import NUM_CLASSES, PREDICATE_CLASSES
from matchclip.errors import LabelFileError
from matchclip.labels import SPLITS, Sample, check_dataset, load_labels

REAL_VAL_IMAGES = {
    "2338545": "val2017/000000014439.jpg",
    "2347167": "val2017/000000087038.jpg",
    "2341671": "val2017/000000570688.jpg",
}


def make_payload() -> dict:
    """A small valid label file: 3 train, 2 val, 2 test samples."""
    data = [
        {"image_id": "10", "file_name": "train2017/a.jpg", "relations": [42, 11, 14]},
        {"image_id": "11", "file_name": "train2017/b.jpg", "relations": [6]},
        {"image_id": "12", "file_name": "train2017/c.jpg", "relations": [55, 20]},
        {"image_id": "20", "file_name": "val2017/d.jpg", "relations": [7, 8]},
        {"image_id": "21", "file_name": "val2017/e.jpg", "relations": [9]},
        {"image_id": "30", "file_name": "val2017/f.jpg", "relations": []},
        {"image_id": "31", "file_name": "val2017/g.jpg", "relations": []},
    ]
    return {
        "data": data,
        "predicate_classes": list(PREDICATE_CLASSES),
        "train_image_ids": ["12", "10", "11"],
        "val_image_ids": ["20", "21"],
        "test_image_ids": ["30", "31"],
    }


def problems_of(path) -> list[str]:
    with pytest.raises(LabelFileError) as info:
        load_labels(path)
    return info.value.problems


def write_image(path, size=(32, 24)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    noise = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)


def write_images(root, payload) -> None:
    for entry in payload["data"]:
        write_image(root / entry["file_name"])


# ---------------------------------------------------------------- valid files


def test_load_split_order(write_label_file):
    labels = load_labels(write_label_file(make_payload()))
    assert labels.image_ids("train") == ["12", "10", "11"]
    assert labels.split("train")[0] == Sample("12", "train2017/c.jpg", (55, 20))


def test_load_predicate_classes(write_label_file):
    labels = load_labels(write_label_file(make_payload()))
    assert labels.predicate_classes == list(PREDICATE_CLASSES)


def test_load_int_image_ids(write_label_file):
    payload = make_payload()
    payload["data"][0]["image_id"] = 10
    payload["train_image_ids"] = [12, 10, "11"]
    labels = load_labels(write_label_file(payload))
    assert labels.image_ids("train") == ["12", "10", "11"]
    assert labels.sample(10).image_id == "10"


def test_load_duplicate_file_keeps_two_samples(write_label_file):
    payload = make_payload()
    payload["data"][1]["file_name"] = "train2017/a.jpg"
    labels = load_labels(write_label_file(payload))
    assert len(labels.split("train")) == 3
    assert labels.file_names(["train"]) == ["train2017/c.jpg", "train2017/a.jpg"]


def test_targets_multi_hot(write_label_file):
    targets = load_labels(write_label_file(make_payload())).targets("train")
    expected = np.zeros((3, NUM_CLASSES), dtype=np.float32)
    expected[0, [55, 20]] = 1
    expected[1, [42, 11, 14]] = 1
    expected[2, 6] = 1
    assert targets.dtype == np.float32
    assert targets.shape == (3, NUM_CLASSES)
    np.testing.assert_array_equal(targets, expected)


def test_targets_test_split_zero(write_label_file):
    labels = load_labels(write_label_file(make_payload()))
    assert labels.targets("test").shape == (2, NUM_CLASSES)
    assert not labels.targets("test").any()


def test_has_labels_per_split(write_label_file):
    labels = load_labels(write_label_file(make_payload()))
    assert labels.has_labels("train")
    assert labels.has_labels("val")
    assert not labels.has_labels("test")


def test_test_samples_have_no_relations(write_label_file):
    labels = load_labels(write_label_file(make_payload()))
    assert all(sample.relations == () for sample in labels.split("test"))


def test_class_counts(write_label_file):
    counts = load_labels(write_label_file(make_payload())).class_counts("train")
    assert counts[14] == 1
    assert counts.sum() == 6


def test_unknown_split_rejected(write_label_file):
    labels = load_labels(write_label_file(make_payload()))
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        labels.split("dev")


# ------------------------------------------------------------- invalid files


def test_malformed_json_line_column(write_label_file):
    path = write_label_file('{\n  "data": [\n    {"image_id": "1",, }\n  ]\n}')
    [problem] = problems_of(path)
    assert "not valid JSON" in problem
    assert "line 3, column 22" in problem


def test_missing_file(tmp_path):
    [problem] = problems_of(tmp_path / "absent.json")
    assert "not found" in problem
    assert "data/psg/psg_cls_basic.json" in problem


def test_top_level_not_object(write_label_file):
    [problem] = problems_of(write_label_file([1, 2]))
    assert "expected an object" in problem


def test_missing_key(write_label_file):
    payload = make_payload()
    del payload["val_image_ids"]
    [problem] = problems_of(write_label_file(payload))
    assert "key 'val_image_ids' is missing from psg_cls_basic.json" in problem


def test_data_wrong_type(write_label_file):
    payload = make_payload()
    payload["data"] = {"10": []}
    problems = problems_of(write_label_file(payload))
    assert any("data of psg_cls_basic.json is a JSON object, expected a list" in p for p in problems)


def test_relations_wrong_type(write_label_file):
    payload = make_payload()
    payload["data"][0]["relations"] = "42 11"
    [problem] = problems_of(write_label_file(payload))
    assert "relations of image '10' of psg_cls_basic.json is a JSON string" in problem


def test_relation_not_integer(write_label_file):
    payload = make_payload()
    payload["data"][0]["relations"] = [42, 1.5, True]
    problems = problems_of(write_label_file(payload))
    assert len(problems) == 2
    assert "relation 1.5 in image '10'" in problems[0]
    assert "relation True in image '10'" in problems[1]


def test_relation_out_of_range(write_label_file):
    payload = make_payload()
    payload["data"][0]["image_id"] = "1234"
    payload["data"][0]["relations"] = [57, 3]
    payload["train_image_ids"][1] = "1234"
    [problem] = problems_of(write_label_file(payload))
    assert problem.startswith(
        "relation id 57 in image '1234' of psg_cls_basic.json is out of range 0..55"
    )


def test_relation_negative(write_label_file):
    payload = make_payload()
    payload["data"][3]["relations"] = [-1]
    [problem] = problems_of(write_label_file(payload))
    assert "relation id -1 in image '20'" in problem


def test_entry_missing_field(write_label_file):
    payload = make_payload()
    del payload["data"][2]["file_name"]
    [problem] = problems_of(write_label_file(payload))
    assert "data entry 2 of psg_cls_basic.json has no 'file_name'" in problem


def test_image_id_wrong_type(write_label_file):
    payload = make_payload()
    payload["data"][2]["image_id"] = [12]
    problems = problems_of(write_label_file(payload))
    assert "image_id of data entry 2 of psg_cls_basic.json is [12]" in problems[0]


def test_file_name_outside_root(write_label_file):
    payload = make_payload()
    payload["data"][0]["file_name"] = "../secret.jpg"
    payload["data"][1]["file_name"] = "/etc/b.jpg"
    problems = problems_of(write_label_file(payload))
    assert len(problems) == 2
    assert "file_name '../secret.jpg' of image '10'" in problems[0]
    assert "file_name '/etc/b.jpg' of image '11'" in problems[1]


def test_duplicate_image_id(write_label_file):
    payload = make_payload()
    payload["data"][1]["image_id"] = "10"
    problems = problems_of(write_label_file(payload))
    assert any("image_id '10' appears in data entries 0 and 1" in p for p in problems)


def test_id_in_two_splits(write_label_file):
    payload = make_payload()
    payload["val_image_ids"].append("10")
    [problem] = problems_of(write_label_file(payload))
    assert "image_id '10' is listed in both train_image_ids and val_image_ids" in problem


def test_id_twice_in_split(write_label_file):
    payload = make_payload()
    payload["test_image_ids"].append("30")
    [problem] = problems_of(write_label_file(payload))
    assert "image_id '30' is listed twice in test_image_ids" in problem


def test_split_id_missing_from_data(write_label_file):
    payload = make_payload()
    payload["val_image_ids"].append("99")
    [problem] = problems_of(write_label_file(payload))
    assert "image_id '99' in val_image_ids of psg_cls_basic.json has no entry in data" in problem


def test_predicate_class_count(write_label_file):
    payload = make_payload()
    payload["predicate_classes"] = payload["predicate_classes"][:50]
    [problem] = problems_of(write_label_file(payload))
    assert "lists 50 predicate classes, expected 56" in problem


def test_predicate_class_duplicate_name(write_label_file):
    payload = make_payload()
    payload["predicate_classes"][7] = "on"
    [problem] = problems_of(write_label_file(payload))
    assert "'on' appears at positions 3 and 7" in problem


def test_several_problems_listed(write_label_file):
    payload = make_payload()
    payload["data"][0]["relations"] = [57]
    payload["data"][1]["image_id"] = "12"
    payload["val_image_ids"].append("99")
    payload["test_image_ids"].append("10")
    payload["predicate_classes"].append("extra")
    with pytest.raises(LabelFileError) as info:
        load_labels(write_label_file(payload))
    problems = info.value.problems
    assert len(problems) == 6
    assert "lists 57 predicate classes" in problems[0]
    assert "relation id 57 in image '10'" in problems[1]
    assert "image_id '12' appears in data entries 1 and 2" in problems[2]
    assert "image_id '11' in train_image_ids" in problems[3]
    assert "image_id '99' in val_image_ids" in problems[4]
    assert "image_id '10' is listed in both train_image_ids and test_image_ids" in problems[5]
    assert "6 problem(s)" in str(info.value)


# ---------------------------------------------------------------- check_dataset


def test_check_dataset_passes(write_label_file, tmp_path):
    payload = make_payload()
    write_images(tmp_path / "coco", payload)
    labels = check_dataset(write_label_file(payload), tmp_path / "coco", progress=False)
    assert len(labels.split("train")) == 3


def test_check_dataset_missing_images(write_label_file, tmp_path):
    payload = make_payload()
    root = tmp_path / "coco"
    write_image(root / "val2017/g.jpg")
    labels_path = write_label_file(payload)
    with pytest.raises(LabelFileError) as info:
        check_dataset(labels_path, root, progress=False)
    [problem] = info.value.problems
    assert "6 of 7 image files" in problem
    assert "first 5: train2017/c.jpg, train2017/a.jpg, train2017/b.jpg, val2017/d.jpg, val2017/e.jpg;" in problem
    assert "val2017/f.jpg" not in problem
    assert f"python -m matchclip data download --labels {labels_path} --out {root}" in problem


def test_check_dataset_missing_root(write_label_file, tmp_path):
    with pytest.raises(LabelFileError) as info:
        check_dataset(write_label_file(make_payload()), tmp_path / "absent", progress=False)
    [problem] = info.value.problems
    assert "image folder" in problem
    assert "does not exist" in problem


def test_check_dataset_truncated_image(write_label_file, tmp_path):
    payload = make_payload()
    root = tmp_path / "coco"
    write_images(root, payload)
    for name in ("train2017/a.jpg", "val2017/e.jpg"):
        data = (root / name).read_bytes()
        (root / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(LabelFileError) as info:
        check_dataset(write_label_file(payload), root, progress=False, workers=2)
    problems = info.value.problems
    assert len(problems) == 2
    assert "train2017/a.jpg" in problems[0]
    assert "truncated" in problems[0]
    assert "val2017/e.jpg" in problems[1]


def test_check_dataset_unreadable_image(write_label_file, tmp_path):
    payload = make_payload()
    root = tmp_path / "coco"
    write_images(root, payload)
    (root / "val2017/d.jpg").write_bytes(b"<html>not an image</html>")
    with pytest.raises(LabelFileError) as info:
        check_dataset(write_label_file(payload), root, progress=False)
    [problem] = info.value.problems
    assert "val2017/d.jpg" in problem


def test_check_dataset_no_decode(write_label_file, tmp_path):
    payload = make_payload()
    root = tmp_path / "coco"
    write_images(root, payload)
    (root / "val2017/d.jpg").write_bytes(b"garbage")
    labels = check_dataset(write_label_file(payload), root, decode=False, progress=False)
    assert labels.image_ids("val") == ["20", "21"]


def test_check_dataset_selected_splits(write_label_file, tmp_path):
    payload = make_payload()
    root = tmp_path / "coco"
    write_images(root, payload)
    (root / "train2017/a.jpg").unlink()
    labels = check_dataset(write_label_file(payload), root, splits=("val", "test"), progress=False)
    assert len(labels.split("test")) == 2


def test_check_dataset_label_and_image_problems(write_label_file, tmp_path):
    payload = make_payload()
    payload["data"][0]["relations"] = [60]
    with pytest.raises(LabelFileError) as info:
        check_dataset(write_label_file(payload), tmp_path, progress=False)
    problems = info.value.problems
    assert len(problems) == 2
    assert "relation id 60" in problems[0]
    assert "6 of 6 image files" in problems[1]


# ---------------------------------------------------------------- real file


@pytest.fixture
def real_labels(shared_data):
    return load_labels(shared_data / "psg" / "psg_cls_basic.json")


def test_real_split_sizes(real_labels):
    assert [len(real_labels.split(name)) for name in SPLITS] == [4500, 500, 500]


def test_real_train_unique_files(real_labels):
    assert len(real_labels.file_names(["train"])) == 4493


def test_real_test_unlabeled(real_labels):
    assert not real_labels.has_labels("test")
    assert not real_labels.targets("test").any()


def test_real_unlabeled_classes_zero(real_labels):
    counts = real_labels.class_counts("train")
    assert counts[:6].tolist() == [0] * 6
    assert counts[6] == 391


def test_real_class_names(real_labels):
    assert real_labels.predicate_classes == list(PREDICATE_CLASSES)


def test_real_val_images_check(shared_data, write_label_file):
    real = json.loads((shared_data / "psg" / "psg_cls_basic.json").read_text())
    entries = [entry for entry in real["data"] if entry["image_id"] in REAL_VAL_IMAGES]
    payload = {
        "data": entries,
        "predicate_classes": real["predicate_classes"],
        "train_image_ids": [],
        "val_image_ids": list(REAL_VAL_IMAGES),
        "test_image_ids": [],
    }
    labels = check_dataset(write_label_file(payload), shared_data / "coco", progress=False)
    assert [s.file_name for s in labels.split("val")] == list(REAL_VAL_IMAGES.values())
    assert labels.sample("2347167").relations == (32, 46)
