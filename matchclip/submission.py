"""Write and validate challenge submission files (result.txt).

A submission has one line per test image, in the order of the label file's
test_image_ids. Each line contains k distinct class ids in 0..55 separated by
spaces, best first. A trailing newline after the last line is allowed.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np

from .classes import FIRST_SCORED_CLASS, NUM_CLASSES
from .errors import SubmissionError
from .fileio import atomic_write_text

_logger = logging.getLogger(__name__)

DEFAULT_EXPECTED_LINES = 500
MAX_LISTED_PROBLEMS = 10

_INTEGER = re.compile(r"[+-]?[0-9]+")


def _line_rule(k: int) -> str:
    return f"each line needs {k} distinct class ids in 0..{NUM_CLASSES - 1} separated by spaces"


def _check_line(tokens: list[str], *, k: int) -> str | None:
    """Return what is wrong with one line's tokens, or None when it is valid."""
    line_text = " ".join(tokens)
    if not tokens:
        return "is blank"
    if len(tokens) != k:
        return f"has {len(tokens)} ids ('{line_text}')"

    not_integers = [token for token in tokens if not _INTEGER.fullmatch(token)]
    if not_integers:
        listed = ", ".join(f"'{token}'" for token in not_integers)
        return f"has non-integer value(s) {listed} ('{line_text}')"

    ids = [int(token) for token in tokens]
    out_of_range = [value for value in ids if not 0 <= value < NUM_CLASSES]
    if out_of_range:
        listed = ", ".join(str(value) for value in out_of_range)
        return f"has class id(s) {listed} out of range 0..{NUM_CLASSES - 1} ('{line_text}')"

    repeated = sorted({value for value in ids if ids.count(value) > 1})
    if repeated:
        listed = ", ".join(str(value) for value in repeated)
        return f"repeats class id(s) {listed} ('{line_text}')"
    return None


def _raise_problems(location: str, problems: list[str], *, k: int) -> None:
    """Raise one SubmissionError listing the first problems and the count of the rest.

    location: the full path of the file, shown in the message header.
    """
    if not problems:
        return
    if len(problems) == 1:
        raise SubmissionError(f"{problems[0]}; {_line_rule(k)} (file: {location})")

    listed = problems[:MAX_LISTED_PROBLEMS]
    lines = [f"  - {problem}" for problem in listed]
    if len(problems) > len(listed):
        lines.append(f"  ... and {len(problems) - len(listed)} more problem(s)")
    raise SubmissionError(
        f"{len(problems)} problems in submission {location}; {_line_rule(k)}, "
        "one line per test image:\n" + "\n".join(lines)
    )


def _warn_unlabeled_ids(name: str, rows: list[tuple[int, list[int]]]) -> None:
    """Log a warning for lines that predict classes 0..5, which never occur as labels."""
    flagged = [
        (number, [value for value in ids if value < FIRST_SCORED_CLASS])
        for number, ids in rows
        if any(value < FIRST_SCORED_CLASS for value in ids)
    ]
    if not flagged:
        return
    examples = ", ".join(
        f"line {number}: {' '.join(map(str, values))}" for number, values in flagged[:5]
    )
    _logger.warning(
        "%d line(s) of %s predict class ids 0..%d (%s%s); these classes never occur as "
        "labels, so those slots cannot score. Mask classes 0..%d before taking the top-k.",
        len(flagged),
        name,
        FIRST_SCORED_CLASS - 1,
        examples,
        ", ..." if len(flagged) > 5 else "",
        FIRST_SCORED_CLASS - 1,
    )


def _line_count_problem(name: str, count: int, expected_lines: int | None) -> list[str]:
    if expected_lines is None or count == expected_lines:
        return []
    return [
        f"{name} has {count} lines; expected {expected_lines}, one per test image in the "
        "order of test_image_ids"
    ]


def parse_submission_text(
    text: str,
    *,
    location: str | os.PathLike = "result.txt",
    expected_lines: int | None = DEFAULT_EXPECTED_LINES,
    k: int = 3,
) -> np.ndarray:
    """Parse submission text into class ids [num_lines, k] int64.

    location: the file the text belongs to, named in messages. Raises
    SubmissionError listing every bad line (first ten, then a count) and a
    wrong line count. Logs a warning for ids in 0..5.
    """
    name = Path(location).name
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()

    problems = _line_count_problem(name, len(lines), expected_lines)
    rows: list[tuple[int, list[int]]] = []
    for number, line in enumerate(lines, start=1):
        tokens = line.rstrip("\r").split()
        problem = _check_line(tokens, k=k)
        if problem is None:
            rows.append((number, [int(token) for token in tokens]))
        else:
            problems.append(f"line {number} of {name} {problem}")

    _raise_problems(os.fspath(location), problems, k=k)
    _warn_unlabeled_ids(name, rows)
    return np.array([ids for _, ids in rows], dtype=np.int64).reshape(len(rows), k)


def read_submission(path, *, expected_lines: int | None = DEFAULT_EXPECTED_LINES, k: int = 3) -> np.ndarray:
    """Read and validate a submission file; return class ids [num_lines, k] int64.

    expected_lines: the number of test images, or None to accept any count.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SubmissionError(
            f"submission file {path} not found; check the path"
        ) from None
    except OSError as error:
        raise SubmissionError(f"could not read submission file {path}: {error.strerror or error}") from error

    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise SubmissionError(
            f"submission file {path} is not UTF-8 text (invalid byte at offset {error.start}); "
            "write plain text with class ids separated by spaces"
        ) from None

    return parse_submission_text(text, location=path, expected_lines=expected_lines, k=k)


def _as_prediction_array(predictions, *, k: int) -> np.ndarray:
    """Return predictions as int64 [N, k] or raise SubmissionError naming the row."""
    if hasattr(predictions, "detach"):
        predictions = predictions.detach().cpu().numpy()
    try:
        array = np.asarray(predictions)
    except ValueError as error:
        raise SubmissionError(f"predictions must be an array [num_images, {k}]; {error}") from None
    if array.ndim != 2 or array.shape[1] != k:
        raise SubmissionError(
            f"predictions must have shape [num_images, {k}] (top-{k} class ids per image); "
            f"got shape {array.shape}"
        )
    if array.size and not np.issubdtype(array.dtype, np.integer):
        if not np.issubdtype(array.dtype, np.floating) or not np.all(array == np.round(array)):
            raise SubmissionError(f"predictions must be integer class ids; got dtype {array.dtype}")
    return array.astype(np.int64)


def write_submission(path, predictions, *, expected_lines: int | None = DEFAULT_EXPECTED_LINES,
                     k: int = 3) -> Path:
    """Write predictions [N, k] as a submission file, atomically; return its path.

    The predictions pass the same checks as `read_submission` before anything
    is written, so a failed write leaves any previous file in place.
    """
    path = Path(path)
    array = _as_prediction_array(predictions, k=k)
    text = "".join(" ".join(str(value) for value in row) + "\n" for row in array.tolist())

    try:
        parse_submission_text(text, location=path, expected_lines=expected_lines, k=k)
    except SubmissionError as error:
        raise SubmissionError(
            f"predictions not written to {path} (line n is row n-1 of the predictions): {error}"
        ) from None
    atomic_write_text(path, text)
    _logger.info("wrote %d predictions to %s", len(array), os.fspath(path))
    return path
