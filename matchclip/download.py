"""Download the COCO 2017 images that a PSG label file uses.

Only the files the label file names are fetched (about 5,500 of the 123,000
COCO train and val images), each from `base_url/file_name`, for example
http://images.cocodataset.org/train2017/000000466766.jpg. Every download is
decoded completely before it is written atomically to
`image_root/file_name`, so an interrupted or failed run leaves only complete
images behind and a rerun fetches only what is still missing.
"""

from __future__ import annotations

import http.client
import logging
import os
import random
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .errors import ImageError
from .fileio import atomic_write_bytes
from .images import decode_image_bytes, verify_image
from .labels import SPLITS, LabelFile, load_labels
from .progress import progress_bar

logger = logging.getLogger(__name__)

COCO_IMAGE_URL = "http://images.cocodataset.org"

USER_AGENT = "matchclip-image-download"

# HTTP status codes worth retrying: the server or a proxy is busy or failing.
RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass
class DownloadSummary:
    """Outcome of download_images, with `failed` as (file_name, reason) pairs."""

    downloaded: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def total(self) -> int:
        return self.downloaded + self.skipped + len(self.failed)


class _DownloadFailed(Exception):
    """Failed download of one file; `retry` is True when another attempt may succeed."""

    def __init__(self, reason: str, *, retry: bool):
        super().__init__(reason)
        self.retry = retry


def download_images(
    labels: LabelFile | str | os.PathLike,
    image_root: str | os.PathLike,
    *,
    base_url: str = COCO_IMAGE_URL,
    workers: int = 16,
    timeout: float = 60.0,
    retries: int = 3,
    splits: Sequence[str] = SPLITS,
    progress: bool = True,
    backoff: float = 1.0,
) -> DownloadSummary:
    """Download the image files of `splits` that are not yet complete under `image_root`.

    Files that already exist and decode are skipped. Each remaining file is
    fetched in a pool of `workers` threads with a `timeout` in seconds per
    request. A network error, an HTTP 429 or 5xx status, or a body that does
    not decode is retried up to `retries` more times. Retry n waits
    `backoff * 2**(n - 1)` seconds, scaled by a random factor of 0.5 to 1.5.
    Other HTTP errors such as 404 fail at once. Failed files are logged and
    listed in the summary and are never written. A file name used by several
    samples is fetched once.
    """
    if workers < 1:
        raise ValueError(f"workers={workers} is invalid; use 1 or more download threads")
    if retries < 0:
        raise ValueError(f"retries={retries} is invalid; use 0 or more")
    if timeout <= 0:
        raise ValueError(f"timeout={timeout} is invalid; use a positive number of seconds")
    scheme = urllib.parse.urlsplit(base_url).scheme
    if scheme not in ("http", "https"):
        raise ValueError(f"base_url {base_url!r} is invalid; use an http:// or https:// address")

    if not isinstance(labels, LabelFile):
        labels = load_labels(labels)
    image_root = Path(image_root)
    file_names = labels.file_names(splits)
    logger.info(
        "checking %d image files of %s (%s) under %s; missing ones come from %s",
        len(file_names),
        labels.path.name,
        ", ".join(splits),
        image_root,
        base_url,
    )

    summary = DownloadSummary()
    options = dict(
        image_root=image_root,
        base_url=base_url.rstrip("/"),
        timeout=timeout,
        retries=retries,
        backoff=backoff,
    )
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="download")
    try:
        futures = {pool.submit(_fetch_one, name, **options): name for name in file_names}
        bar = progress_bar(total=len(futures), desc="download images", unit="image", enabled=progress)
        with bar:
            for future in as_completed(futures):
                name = futures[future]
                outcome = future.result()
                if outcome == "skipped":
                    summary.skipped += 1
                elif outcome == "downloaded":
                    summary.downloaded += 1
                else:
                    summary.failed.append((name, outcome))
                bar.set_postfix(failed=len(summary.failed), refresh=False)
                bar.update()
    finally:
        # On an error or Ctrl-C, queued downloads are dropped; running ones
        # finish or time out, and atomic writes leave no partial files.
        pool.shutdown(wait=True, cancel_futures=True)

    summary.failed.sort()
    logger.info(
        "downloaded %d, skipped %d already present, failed %d of %d image files",
        summary.downloaded,
        summary.skipped,
        len(summary.failed),
        summary.total,
    )
    if summary.failed:
        logger.error(
            "%d image files failed to download: %s; rerun the same command to retry them",
            len(summary.failed),
            ", ".join(f"{name} ({reason})" for name, reason in summary.failed),
        )
    return summary


def image_url(base_url: str, file_name: str) -> str:
    """Return the URL of `file_name` under `base_url`."""
    return base_url.rstrip("/") + "/" + urllib.parse.quote(file_name, safe="/")


def _fetch_one(
    file_name: str,
    *,
    image_root: Path,
    base_url: str,
    timeout: float,
    retries: int,
    backoff: float,
) -> str:
    """Download one file; return "skipped", "downloaded" or the reason it failed."""
    target = image_root / file_name
    if target.is_file():
        try:
            verify_image(target)
            return "skipped"
        except ImageError as error:
            logger.warning("%s is damaged and is downloaded again: %s", target, error)

    url = image_url(base_url, file_name)
    for attempt in range(retries + 1):
        try:
            data = _request(url, timeout=timeout)
            decode_image_bytes(data, name=url)
        except _DownloadFailed as error:
            reason, retry = str(error), error.retry
        except ImageError as error:
            reason, retry = str(error), True
        else:
            atomic_write_bytes(target, data)
            return "downloaded"

        if not retry or attempt == retries:
            logger.error("download of %s failed after %d attempt(s): %s", url, attempt + 1, reason)
            return reason
        delay = backoff * 2**attempt * random.uniform(0.5, 1.5)
        logger.warning(
            "download of %s failed (attempt %d of %d): %s; retrying in %.1f s",
            url,
            attempt + 1,
            retries + 1,
            reason,
            delay,
        )
        time.sleep(delay)
    raise AssertionError("unreachable: the last attempt returns")


def _request(url: str, *, timeout: float) -> bytes:
    """Fetch the body of `url`; raise _DownloadFailed on any HTTP or network error."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read()
            expected = response.headers.get("Content-Length")
    except urllib.error.HTTPError as error:
        raise _DownloadFailed(
            f"HTTP {error.code} {error.reason} for {url}", retry=error.code in RETRY_STATUS
        ) from error
    except urllib.error.URLError as error:
        raise _DownloadFailed(f"could not reach {url}: {error.reason}", retry=True) from error
    except (socket.timeout, TimeoutError) as error:
        raise _DownloadFailed(f"timed out after {timeout:g} s reading {url}", retry=True) from error
    except (http.client.HTTPException, ConnectionError) as error:
        raise _DownloadFailed(
            f"connection to {url} failed: {type(error).__name__} {error}", retry=True
        ) from error

    if expected is not None and expected.isdigit() and int(expected) != len(data):
        raise _DownloadFailed(
            f"received {len(data)} of {expected} bytes from {url}", retry=True
        )
    return data
