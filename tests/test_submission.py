"""Submission files: round trip, every kind of bad line, the real sample submission."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from matchclip.errors import SubmissionError
from matchclip.submission import (
    parse_submission_text,
    read_submission,
    write_submission,
)


def _valid_lines(count: int) -> list[str]:
    return [f"{6 + index % 50} {6 + (index + 1) % 50} {6 + (index + 2) % 50}" for index in range(count)]


def _write(tmp_path, lines: list[str], *, trailing_newline: bool = True):
    path = tmp_path / "result.txt"
    path.write_text("\n".join(lines) + ("\n" if trailing_newline else ""), encoding="utf-8")
    return path


def test_round_trip(tmp_path):
    predictions = np.array([[6, 21, 7], [16, 55, 10], [48, 46, 47]])
    path = write_submission(tmp_path / "result.txt", predictions, expected_lines=3)
    np.testing.assert_array_equal(read_submission(path, expected_lines=3), predictions)


def test_write_format(tmp_path):
    path = write_submission(tmp_path / "result.txt", [[6, 21, 7], [16, 55, 10]], expected_lines=2)
    assert path.read_text(encoding="utf-8") == "6 21 7\n16 55 10\n"


def test_write_accepts_torch_tensor(tmp_path):
    predictions = torch.tensor([[6, 21, 7], [16, 55, 10]])
    path = write_submission(tmp_path / "result.txt", predictions, expected_lines=2)
    assert path.read_text(encoding="utf-8") == "6 21 7\n16 55 10\n"


def test_write_default_expects_500_lines(tmp_path):
    with pytest.raises(SubmissionError, match="has 2 lines; expected 500"):
        write_submission(tmp_path / "result.txt", [[6, 21, 7], [16, 55, 10]])


def test_write_rejects_bad_row_and_keeps_old_file(tmp_path):
    path = write_submission(tmp_path / "result.txt", [[6, 7, 8]], expected_lines=1)
    with pytest.raises(SubmissionError, match="line 1 of result.txt repeats class id"):
        write_submission(path, [[6, 6, 8]], expected_lines=1)
    assert path.read_text(encoding="utf-8") == "6 7 8\n"


def test_write_rejects_wrong_width(tmp_path):
    with pytest.raises(SubmissionError, match=r"shape \[num_images, 3\]"):
        write_submission(tmp_path / "result.txt", np.zeros((2, 2), dtype=int), expected_lines=2)


def test_write_rejects_fractional_ids(tmp_path):
    with pytest.raises(SubmissionError, match="integer class ids"):
        write_submission(tmp_path / "result.txt", np.full((1, 3), 6.5), expected_lines=1)


def test_write_leaves_no_temporary_file(tmp_path):
    write_submission(tmp_path / "result.txt", [[6, 7, 8]], expected_lines=1)
    assert [path.name for path in tmp_path.iterdir()] == ["result.txt"]


def test_read_without_trailing_newline(tmp_path):
    path = _write(tmp_path, _valid_lines(4), trailing_newline=False)
    assert read_submission(path, expected_lines=4).shape == (4, 3)


def test_read_accepts_crlf(tmp_path):
    path = tmp_path / "result.txt"
    path.write_bytes(b"6 7 8\r\n9 10 11\r\n")
    np.testing.assert_array_equal(read_submission(path, expected_lines=2), [[6, 7, 8], [9, 10, 11]])


def test_read_any_line_count_when_none(tmp_path):
    path = _write(tmp_path, _valid_lines(7))
    assert read_submission(path, expected_lines=None).shape == (7, 3)


def test_read_custom_k(tmp_path):
    path = _write(tmp_path, ["6 7 8 9 10", "11 12 13 14 15"])
    assert read_submission(path, expected_lines=2, k=5).shape == (2, 5)


def test_read_returns_int64(tmp_path):
    path = _write(tmp_path, _valid_lines(2))
    assert read_submission(path, expected_lines=2).dtype == np.int64


def _error_for(tmp_path, bad_line: str, *, line_number: int = 3, total: int = 5) -> str:
    lines = _valid_lines(total)
    lines[line_number - 1] = bad_line
    path = _write(tmp_path, lines)
    with pytest.raises(SubmissionError) as error:
        read_submission(path, expected_lines=total)
    return str(error.value)


def test_too_few_ids_names_line(tmp_path):
    message = _error_for(tmp_path, "6 21", line_number=3)
    assert "line 3 of result.txt has 2 ids ('6 21')" in message
    assert "each line needs 3 distinct class ids in 0..55 separated by spaces" in message


def test_too_many_ids_names_line(tmp_path):
    message = _error_for(tmp_path, "6 21 7 8", line_number=2)
    assert "line 2 of result.txt has 4 ids ('6 21 7 8')" in message


def test_non_integer_names_value(tmp_path):
    message = _error_for(tmp_path, "6 x 7.0", line_number=4)
    assert "line 4 of result.txt has non-integer value(s) 'x', '7.0'" in message


def test_out_of_range_names_value(tmp_path):
    message = _error_for(tmp_path, "6 56 -1", line_number=5)
    assert "line 5 of result.txt has class id(s) 56, -1 out of range 0..55" in message


def test_duplicate_ids_names_value(tmp_path):
    message = _error_for(tmp_path, "6 21 6", line_number=1)
    assert "line 1 of result.txt repeats class id(s) 6" in message


def test_blank_line_names_line(tmp_path):
    message = _error_for(tmp_path, "", line_number=2)
    assert "line 2 of result.txt is blank" in message


def test_whitespace_only_line_is_blank(tmp_path):
    message = _error_for(tmp_path, "   ", line_number=2)
    assert "line 2 of result.txt is blank" in message


def test_message_names_full_path(tmp_path):
    message = _error_for(tmp_path, "6 21")
    assert str(tmp_path / "result.txt") in message


def test_too_few_lines(tmp_path):
    path = _write(tmp_path, _valid_lines(499))
    with pytest.raises(SubmissionError, match="result.txt has 499 lines; expected 500"):
        read_submission(path)


def test_too_many_lines(tmp_path):
    path = _write(tmp_path, _valid_lines(501))
    with pytest.raises(SubmissionError, match="result.txt has 501 lines; expected 500"):
        read_submission(path)


def test_extra_blank_line_at_end(tmp_path):
    path = tmp_path / "result.txt"
    path.write_text("\n".join(_valid_lines(3)) + "\n\n", encoding="utf-8")
    with pytest.raises(SubmissionError, match="line 4 of result.txt is blank"):
        read_submission(path, expected_lines=3)


def test_empty_file(tmp_path):
    path = tmp_path / "result.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(SubmissionError, match="has 0 lines; expected 500"):
        read_submission(path)


def test_reports_all_bad_lines_at_once(tmp_path):
    lines = _valid_lines(20)
    for number in (2, 5, 9):
        lines[number - 1] = "6 6 6"
    path = _write(tmp_path, lines)
    with pytest.raises(SubmissionError) as error:
        read_submission(path, expected_lines=20)
    message = str(error.value)
    assert message.startswith("3 problems in submission")
    for number in (2, 5, 9):
        assert f"line {number} of result.txt repeats" in message


def test_lists_first_ten_then_count(tmp_path):
    lines = _valid_lines(30)
    for number in range(1, 14):
        lines[number - 1] = "6 21"
    path = _write(tmp_path, lines)
    with pytest.raises(SubmissionError) as error:
        read_submission(path, expected_lines=30)
    message = str(error.value)
    assert "line 10 of result.txt" in message
    assert "line 11 of result.txt" not in message
    assert "and 3 more problem(s)" in message


def test_line_count_and_bad_lines_together(tmp_path):
    lines = _valid_lines(4)
    lines[0] = "a b c"
    path = _write(tmp_path, lines)
    with pytest.raises(SubmissionError) as error:
        read_submission(path, expected_lines=5)
    message = str(error.value)
    assert "has 4 lines; expected 5" in message
    assert "line 1 of result.txt has non-integer" in message


def test_missing_file(tmp_path):
    with pytest.raises(SubmissionError, match="not found"):
        read_submission(tmp_path / "absent.txt")


def test_non_utf8_file(tmp_path):
    path = tmp_path / "result.txt"
    path.write_bytes(b"6 7 8\n\xff\xfe 1\n")
    with pytest.raises(SubmissionError, match="not UTF-8"):
        read_submission(path, expected_lines=2)


def test_unlabeled_ids_warn(tmp_path, caplog):
    path = _write(tmp_path, ["6 7 8", "0 9 10", "11 5 12"])
    with caplog.at_level(logging.WARNING, logger="matchclip.submission"):
        predictions = read_submission(path, expected_lines=3)
    assert predictions.shape == (3, 3)
    assert "2 line(s) of result.txt predict class ids 0..5" in caplog.text
    assert "line 2: 0" in caplog.text
    assert "line 3: 5" in caplog.text


def test_scored_ids_do_not_warn(tmp_path, caplog):
    path = _write(tmp_path, ["6 7 8", "53 54 55"])
    with caplog.at_level(logging.WARNING, logger="matchclip.submission"):
        read_submission(path, expected_lines=2)
    assert caplog.text == ""


def test_parse_text_names_location():
    with pytest.raises(SubmissionError, match="line 1 of preds.txt has 1 ids"):
        parse_submission_text("6\n", location="out/preds.txt", expected_lines=1)


def test_sample_submission_validates(shared_data):
    path = shared_data / "psg" / "examples" / "sample_submission_500x3.txt"
    predictions = read_submission(path, expected_lines=500, k=3)
    assert predictions.shape == (500, 3)
    assert predictions.min() >= 0
    assert predictions.max() <= 55
