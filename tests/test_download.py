"""Image download against a local HTTP server on 127.0.0.1."""

from __future__ import annotations

import collections
import functools
import http.server
import logging
import threading

import numpy as np
import pytest
from PIL import Image

from matchclip.classes import PREDICATE_CLASSES
from matchclip.download import download_images, image_url
from matchclip.images import load_image
from matchclip.labels import load_labels

FILES = ["train2017/a.jpg", "train2017/b.jpg", "val2017/c.jpg", "val2017/d.jpg"]


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a folder, counts GET requests per path and can fail paths on purpose."""

    requests: collections.Counter
    # path -> number of 503 responses to send before serving the file
    busy: dict

    def do_GET(self):
        self.requests[self.path] += 1
        if self.busy.get(self.path, 0) > 0:
            self.busy[self.path] -= 1
            self.send_error(503, "busy")
            return
        super().do_GET()

    def log_message(self, format, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """Start an HTTP server for tmp_path/served; yield (base_url, handler class)."""
    served = tmp_path / "served"
    for index, name in enumerate(FILES):
        path = served / name
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.random.default_rng(index).integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(path, quality=90)

    handler = type("Handler", (CountingHandler,), {"requests": collections.Counter(), "busy": {}})
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(served))
    )
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", handler, served
    httpd.shutdown()
    httpd.server_close()
    thread.join()


@pytest.fixture
def label_path(write_label_file):
    """Label file over FILES; images 10 and 11 share one file, as in the real train split."""
    data = [
        {"image_id": "10", "file_name": FILES[0], "relations": [14]},
        {"image_id": "11", "file_name": FILES[0], "relations": [20]},
        {"image_id": "12", "file_name": FILES[1], "relations": [21]},
        {"image_id": "20", "file_name": FILES[2], "relations": [7]},
        {"image_id": "30", "file_name": FILES[3], "relations": []},
    ]
    return write_label_file(
        {
            "data": data,
            "predicate_classes": list(PREDICATE_CLASSES),
            "train_image_ids": ["10", "11", "12"],
            "val_image_ids": ["20"],
            "test_image_ids": ["30"],
        }
    )


def download(label_path, root, base_url, **options):
    options = {"workers": 4, "timeout": 5.0, "retries": 2, "backoff": 0.0, "progress": False} | options
    return download_images(label_path, root, base_url=base_url, **options)


def leftovers(root):
    return [path.name for path in root.rglob("*") if path.name.endswith(".tmp")]


def test_download_all_files(label_path, server, tmp_path):
    base_url, handler, served = server
    root = tmp_path / "coco"
    summary = download(label_path, root, base_url)
    assert summary.downloaded == 4
    assert summary.failed == []
    for name in FILES:
        assert (root / name).read_bytes() == (served / name).read_bytes()


def test_download_shared_file_once(label_path, server, tmp_path):
    base_url, handler, _ = server
    download(label_path, tmp_path / "coco", base_url)
    assert handler.requests["/train2017/a.jpg"] == 1


def test_download_rerun_skips(label_path, server, tmp_path):
    base_url, handler, _ = server
    root = tmp_path / "coco"
    download(label_path, root, base_url)
    requests_after_first = sum(handler.requests.values())
    summary = download(label_path, root, base_url)
    assert summary.skipped == 4
    assert summary.downloaded == 0
    assert sum(handler.requests.values()) == requests_after_first


def test_download_resumes_missing(label_path, server, tmp_path):
    base_url, handler, _ = server
    root = tmp_path / "coco"
    download(label_path, root, base_url)
    (root / FILES[2]).unlink()
    summary = download(label_path, root, base_url)
    assert summary.downloaded == 1
    assert summary.skipped == 3
    assert handler.requests["/val2017/c.jpg"] == 2


def test_download_replaces_damaged_file(label_path, server, tmp_path):
    base_url, _, served = server
    root = tmp_path / "coco"
    (root / "val2017").mkdir(parents=True)
    (root / FILES[3]).write_bytes((served / FILES[3]).read_bytes()[:100])
    summary = download(label_path, root, base_url)
    assert summary.downloaded == 4
    assert load_image(root / FILES[3]).size == (32, 24)


def test_download_corrupt_file_fails(label_path, server, tmp_path, caplog):
    base_url, handler, served = server
    data = (served / FILES[1]).read_bytes()
    (served / FILES[1]).write_bytes(data[: len(data) // 2])
    root = tmp_path / "coco"
    with caplog.at_level(logging.ERROR, logger="matchclip.download"):
        summary = download(label_path, root, base_url, retries=2)
    assert [name for name, _ in summary.failed] == [FILES[1]]
    assert "truncated" in summary.failed[0][1]
    assert not (root / FILES[1]).exists()
    assert handler.requests["/train2017/b.jpg"] == 3
    assert summary.downloaded == 3
    assert leftovers(root) == []
    assert FILES[1] in caplog.text


def test_download_404_fails_without_retry(label_path, server, tmp_path):
    base_url, handler, served = server
    (served / FILES[2]).unlink()
    root = tmp_path / "coco"
    summary = download(label_path, root, base_url)
    assert len(summary.failed) == 1
    assert summary.failed[0][0] == FILES[2]
    assert "HTTP 404" in summary.failed[0][1]
    assert handler.requests["/val2017/c.jpg"] == 1
    assert not (root / FILES[2]).exists()


def test_download_retries_busy_server(label_path, server, tmp_path):
    base_url, handler, _ = server
    handler.busy["/val2017/d.jpg"] = 2
    summary = download(label_path, tmp_path / "coco", base_url, retries=2)
    assert summary.downloaded == 4
    assert handler.requests["/val2017/d.jpg"] == 3


def test_download_gives_up_after_retries(label_path, server, tmp_path):
    base_url, handler, _ = server
    handler.busy["/val2017/d.jpg"] = 10
    summary = download(label_path, tmp_path / "coco", base_url, retries=1)
    assert summary.failed[0][0] == FILES[3]
    assert "HTTP 503" in summary.failed[0][1]
    assert handler.requests["/val2017/d.jpg"] == 2


def test_download_unreachable_server(label_path, tmp_path):
    # Port 9 on 127.0.0.1 has no listener, so every connection is refused.
    summary = download(label_path, tmp_path / "coco", "http://127.0.0.1:9", retries=1)
    assert len(summary.failed) == 4
    assert "could not reach" in summary.failed[0][1]


def test_download_selected_splits(label_path, server, tmp_path):
    base_url, _, _ = server
    root = tmp_path / "coco"
    summary = download(load_labels(label_path), root, base_url, splits=("test",))
    assert summary.downloaded == 1
    assert sorted(path.name for path in root.rglob("*.jpg")) == ["d.jpg"]


@pytest.mark.parametrize(
    "options, message",
    [
        ({"workers": 0}, "workers=0"),
        ({"retries": -1}, "retries=-1"),
        ({"timeout": 0}, "timeout=0"),
        ({"base_url": "file:///etc"}, "http://"),
    ],
)
def test_download_invalid_options(label_path, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        download_images(label_path, tmp_path, **options)


def test_image_url_joins():
    url = image_url("http://images.cocodataset.org/", "train2017/000000466766.jpg")
    assert url == "http://images.cocodataset.org/train2017/000000466766.jpg"
