"""Tables, figures and the README of `reports/`, each with its provenance.

Every table is written as Markdown and CSV under `reports/tables/`, every
figure as PNG under `reports/figures/`, and each gets a JSON sidecar with its
caption and provenance (profile, data, backbone, seed, git commit, date and
the notebook that made it). `write_readme` rebuilds `reports/README.md` from
those sidecars, so the README always lists exactly what is on disk. All files
are written atomically.

Set MATCHCLIP_REPORTS_DIR to write somewhere else than `reports/` (the
notebook tests do, so that running them leaves the committed reports alone).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from . import paths
from .config import RunConfig
from .fileio import atomic_write, atomic_write_json, atomic_write_text

logger = logging.getLogger(__name__)

REPORTS_DIR_VARIABLE = "MATCHCLIP_REPORTS_DIR"
DEMO_NOTE = "demo profile: synthetic data, random tiny backbone; not comparable to the published numbers"
README_NAME = "README.md"
FIGURE_DPI = 150


def output_dir() -> Path:
    """Folder of the generated reports: $MATCHCLIP_REPORTS_DIR, else reports/ in the project."""
    override = os.environ.get(REPORTS_DIR_VARIABLE)
    if override:
        return Path(override).expanduser().resolve()
    return paths.reports_dir()


def is_demo(config: RunConfig) -> bool:
    """True for runs of the demo profile or on the demo preset (synthetic data, random tiny backbone)."""
    return config.profile == "demo" or config.preset == "demo"


def caption(text: str, config: RunConfig) -> str:
    """Return `text` with the demo disclaimer appended when `config` is a demo configuration."""
    text = text.rstrip()
    if not is_demo(config):
        return text
    separator = "" if text.endswith((".", ":", ";")) else "."
    return f"{text}{separator} ({DEMO_NOTE}.)"


@dataclass
class Provenance:
    """Origin of a table or figure: the notebook, configuration, code version and date that produced it."""

    source: str
    profile: str | None
    data: str
    backbone: str
    seed: int
    commit: str
    date: str
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """Format the provenance as one Markdown line for the README."""
        settings = ", ".join(f"{key}={value}" for key, value in sorted(self.settings.items())) or "none"
        return (
            f"source `{self.source}`; profile `{self.profile}`; data `{self.data}`; backbone `{self.backbone}`; "
            f"seed {self.seed}; overrides: {settings}; commit `{self.commit}`; date {self.date}"
        )


def provenance(
    config: RunConfig,
    *,
    source: str,
    settings: Mapping[str, Any] | None = None,
    date: str | None = None,
) -> Provenance:
    """Describe the configuration behind an output made by `source` (a notebook or function name).

    `settings` are the overrides the caller applied on top of the profile.
    """
    return Provenance(
        source=source,
        profile=config.profile,
        data=describe_data(config),
        backbone=describe_backbone(config),
        seed=int(config.seed),
        commit=git_commit(),
        date=date or utc_now(),
        settings={key: value for key, value in dict(settings or {}).items() if value is not None},
    )


def describe_data(config: RunConfig) -> str:
    """Label file of a configuration, relative to the project folder when it lies inside it."""
    labels = Path(config.labels) if config.labels else paths.real_labels_path()
    return relative_to_project(labels)


def describe_backbone(config: RunConfig) -> str:
    weights = config.pretrained if config.pretrained else f"random init, seed {config.seed}"
    return f"{config.backbone} ({weights})"


def relative_to_project(path: str | os.PathLike) -> str:
    """`path` relative to the project folder when inside it (so reports hold no machine paths), else as given."""
    path = Path(path)
    absolute = path if path.is_absolute() else paths.project_root() / path
    try:
        return absolute.resolve().relative_to(paths.project_root()).as_posix()
    except ValueError:
        return str(path)


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def git_commit(root: str | os.PathLike | None = None) -> str:
    """Short commit hash of the project checkout, "+dirty" when tracked files outside reports/ differ from it.

    reports/ is left out because every run rewrites it, so a rerun of a clean
    checkout still names a clean commit. Returns "uncommitted" in a repository without commits and "unknown" when
    git or the repository is not available.
    """
    root = Path(root) if root is not None else paths.project_root()
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=30, check=False,
        )
        if head.returncode != 0:
            inside = subprocess.run(
                ["git", "-C", str(root), "rev-parse", "--is-inside-work-tree"],
                capture_output=True, text=True, timeout=30, check=False,
            )
            return "uncommitted" if inside.returncode == 0 else "unknown"
        status = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)reports"],
            capture_output=True, text=True, timeout=30, check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    commit = head.stdout.strip()
    return commit + "+dirty" if status.stdout.strip() else commit


def markdown_table(frame: pd.DataFrame) -> str:
    """Render a DataFrame as a GitHub pipe table (the index is dropped)."""
    header = [str(column) for column in frame.columns]
    rows = [[_markdown_cell(value) for value in row] for row in frame.itertuples(index=False)]
    lines = ["| " + " | ".join(_escape(cell) for cell in header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines.extend("| " + " | ".join(_escape(cell) for cell in row) + " |" for row in rows)
    return "\n".join(lines)


def _markdown_cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return ""
    return str(value)


def _escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_table(
    frame: pd.DataFrame,
    name: str,
    *,
    caption: str,
    provenance: Provenance,
    out_dir: str | os.PathLike | None = None,
) -> dict[str, Path]:
    """Write `frame` as tables/NAME.md, tables/NAME.csv and the sidecar tables/NAME.json.

    Returns the written paths by kind ("markdown", "csv", "meta").
    """
    _check_name(name)
    folder = Path(out_dir) if out_dir is not None else output_dir()
    tables = folder / "tables"
    markdown = f"**{caption}**\n\n{markdown_table(frame)}\n\n<sub>{provenance.line()}</sub>\n"

    written = {
        "markdown": atomic_write_text(tables / f"{name}.md", markdown),
        "csv": atomic_write_text(tables / f"{name}.csv", frame.to_csv(index=False)),
    }
    meta = {
        "kind": "table",
        "name": name,
        "caption": caption,
        "provenance": provenance.to_dict(),
        "files": {"markdown": f"tables/{name}.md", "csv": f"tables/{name}.csv"},
    }
    written["meta"] = atomic_write_json(tables / f"{name}.json", meta)
    logger.info("wrote table %s to %s", name, tables)
    return written


def save_figure(
    figure,
    name: str,
    *,
    caption: str,
    provenance: Provenance,
    out_dir: str | os.PathLike | None = None,
    dpi: int = FIGURE_DPI,
) -> Path:
    """Save a matplotlib figure as figures/NAME.png with its sidecar figures/NAME.json; return the PNG path."""
    _check_name(name)
    folder = Path(out_dir) if out_dir is not None else output_dir()
    figures = folder / "figures"
    png = atomic_write(
        figures / f"{name}.png",
        lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None}),
    )
    meta = {
        "kind": "figure",
        "name": name,
        "caption": caption,
        "provenance": provenance.to_dict(),
        "files": {"png": f"figures/{name}.png"},
    }
    atomic_write_json(figures / f"{name}.json", meta)
    logger.info("wrote figure %s to %s", name, figures)
    return png


def _check_name(name: str) -> None:
    if not name or any(character in name for character in "/\\ ") or name.startswith("."):
        raise ValueError(f"report name {name!r} must be a plain file stem without spaces or slashes, e.g. 'table2_main'")


def read_entries(out_dir: str | os.PathLike | None = None) -> list[dict]:
    """Sidecars of every table and figure under `out_dir`, sorted by source notebook, then kind and name."""
    folder = Path(out_dir) if out_dir is not None else output_dir()
    entries = []
    for sidecar in sorted([*folder.glob("tables/*.json"), *folder.glob("figures/*.json")]):
        try:
            entry = json.loads(sidecar.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("skipping unreadable report sidecar %s: %s", sidecar, error)
            continue
        entries.append(entry)
    kind_order = {"table": 0, "figure": 1}
    entries.sort(key=lambda e: (e["provenance"]["source"], kind_order.get(e["kind"], 2), e["name"]))
    return entries


def write_readme(out_dir: str | os.PathLike | None = None) -> Path:
    """Rebuild README.md of the reports folder from the sidecars of its tables and figures."""
    from .published import SOURCE

    folder = Path(out_dir) if out_dir is not None else output_dir()
    entries = read_entries(folder)
    lines = [
        "# MatchCLIP reports",
        "",
        "Generated by `python -m matchclip.notebooks run`, which executes the notebooks in `notebooks/`",
        "(executed copies in `reports/executed/`) and rewrites this file. Do not edit it by hand.",
        f"Published numbers come from {SOURCE} and stand beside ours in each table.",
        "",
    ]
    if not entries:
        lines.append("No tables or figures yet: run `python -m matchclip.notebooks run`.")

    current_source = None
    for entry in entries:
        source = entry["provenance"]["source"]
        if source != current_source:
            lines += [f"## {source}", ""]
            current_source = source
        lines += _readme_entry(folder, entry)

    return atomic_write_text(folder / README_NAME, "\n".join(lines).rstrip() + "\n")


def _readme_entry(folder: Path, entry: dict) -> list[str]:
    provenance = Provenance(**entry["provenance"])
    lines = [f"### {entry['kind'].capitalize()} `{entry['name']}`", ""]
    if entry["kind"] == "table":
        markdown_path = folder / entry["files"]["markdown"]
        body = markdown_path.read_text(encoding="utf-8").strip() if markdown_path.is_file() else "(table file missing)"
        lines += [body, "", f"CSV: [{entry['files']['csv']}]({entry['files']['csv']})", ""]
    else:
        png = entry["files"]["png"]
        lines += [f"**{entry['caption']}**", "", f"![{entry['name']}]({png})", "", f"<sub>{provenance.line()}</sub>", ""]
    return lines
