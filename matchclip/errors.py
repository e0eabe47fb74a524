"""Exception types raised by matchclip.

Every error message names the file, the offending value and the fix, so a
user can act on it without reading the code.
"""

from __future__ import annotations


class MatchclipError(Exception):
    """Base class of all errors raised on bad input or a failed step."""


class LabelFileError(MatchclipError):
    """A PSG label file is malformed; `problems` lists every problem found."""

    def __init__(self, path, problems: list[str]):
        self.path = str(path)
        self.problems = list(problems)
        listing = "\n".join(f"  - {problem}" for problem in self.problems)
        super().__init__(
            f"{len(self.problems)} problem(s) in label file {self.path}:\n{listing}"
        )


class ImageError(MatchclipError):
    """An image file is missing, unreadable or truncated."""


class CacheError(MatchclipError):
    """A feature cache is damaged, incomplete or does not match its inputs."""


class SubmissionError(MatchclipError):
    """A result.txt submission file is malformed."""


class ConfigError(MatchclipError):
    """A configuration, profile or preset value is invalid."""


class WriteError(MatchclipError):
    """Writing a file failed; the previous version of the file is kept."""
