"""Run the report notebooks, and the helpers those notebooks call.

Command line:

    python -m matchclip.notebooks run [--profile P] [--only NAME ...] [-p KEY VALUE ...]

executes every notebook of `notebooks/` with papermill into
`reports/executed/` (the committed notebooks are never overwritten) and then
rewrites `reports/README.md`. Without --profile it uses "paper" when the real
data is in place (data/psg/psg_cls_basic.json and data/coco/) and "demo"
otherwise.

    python -m matchclip.notebooks refresh [--only NAME ...]

executes the committed notebooks in place with their default (demo)
parameters, so that their stored outputs, which `pytest --nbval notebooks/`
compares against, match the current code.

Inside a notebook, `NotebookSession` resolves the profile plus overrides,
checks that the inputs exist before any training, and publishes tables and
figures with their provenance through `matchclip.reports`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from . import paths
from .config import RunConfig, resolve_config
from .errors import MatchclipError
from .fileio import atomic_write_text

if TYPE_CHECKING:
    import pandas

logger = logging.getLogger(__name__)

NOTEBOOK_GLOB = "[0-9][0-9]_*.ipynb"
EXECUTED_FOLDER = "executed"
# open_clip logs this on every randomly initialised model, which is the
# demo backbone's intended state; the notebooks drop it to keep stderr clean.
RANDOM_INIT_MESSAGE = "No pretrained weights loaded for model"


# Runner ---------------------------------------------------------------------------------------------


def notebooks_dir() -> Path:
    return paths.project_root() / "notebooks"


def discover_notebooks(folder: str | os.PathLike | None = None, only: Sequence[str] | None = None) -> list[Path]:
    """Report notebooks (NN_name.ipynb) of `folder`, in name order.

    `only` selects notebooks by file name, stem or number prefix ("02",
    "02_main_results", "02_main_results.ipynb"); an unknown name raises
    MatchclipError listing the available notebooks.
    """
    folder = Path(folder) if folder is not None else notebooks_dir()
    found = sorted(folder.glob(NOTEBOOK_GLOB))
    if not only:
        return found

    selected = []
    for name in only:
        matches = [path for path in found if name in (path.name, path.stem, path.stem.split("_", 1)[0])]
        if not matches:
            available = ", ".join(path.stem for path in found) or "none"
            raise MatchclipError(f"no notebook named {name!r} in {folder}; available notebooks: {available}")
        selected.extend(path for path in matches if path not in selected)
    return sorted(selected)


def real_data_present() -> bool:
    """True when the real PSG label file and COCO image folder are at their default places."""
    return paths.real_labels_path().is_file() and paths.real_image_root().is_dir()


def default_profile() -> str:
    """ "paper" when the real data is in place, else "demo"."""
    return "paper" if real_data_present() else "demo"


def run_notebooks(
    *,
    profile: str | None = None,
    only: Sequence[str] | None = None,
    parameters: Mapping[str, Any] | None = None,
    out_dir: str | os.PathLike | None = None,
    kernel_name: str | None = None,
) -> list[Path]:
    """Execute the notebooks with papermill and rewrite the reports README; return the executed copies.

    Each notebook gets the parameters `profile` plus `parameters`. The
    executed copies go to `out_dir` (default reports/executed/). A failing
    notebook raises MatchclipError with the cell's error after its partial
    output was written, so the copy shows the failing cell.
    """
    import papermill

    from . import reports

    profile = profile or default_profile()
    notebooks = discover_notebooks(only=only)
    if not notebooks:
        raise MatchclipError(f"no notebooks matching {NOTEBOOK_GLOB} in {notebooks_dir()}")
    out_dir = Path(out_dir) if out_dir is not None else reports.output_dir() / EXECUTED_FOLDER
    out_dir.mkdir(parents=True, exist_ok=True)
    # The kernels inherit the environment: no progress bars in the executed notebooks.
    os.environ.setdefault("TQDM_DISABLE", "1")

    executed = []
    for notebook in notebooks:
        target = out_dir / notebook.name
        logger.info("running %s with profile %s", notebook.name, profile)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(notebook),
                str(target),
                parameters={"profile": profile, **dict(parameters or {})},
                cwd=str(notebook.parent),
                kernel_name=kernel_name,
                progress_bar=False,
            )
        except papermill.PapermillExecutionError as error:
            raise MatchclipError(
                f"notebook {notebook.name} failed with profile {profile!r}: {error.ename}: {error.evalue}\n"
                f"The executed copy {target} shows the failing cell."
            ) from error
        logger.info("finished %s in %.0f s -> %s", notebook.name, time.perf_counter() - started, target)
        executed.append(target)

    readme = reports.write_readme()
    logger.info("rewrote %s", readme)
    return executed


def refresh_notebooks(*, only: Sequence[str] | None = None, kernel_name: str = "python3") -> list[Path]:
    """Execute the committed notebooks in place with their default parameters and store the outputs.

    This is the maintainer's step after a change of results: `pytest --nbval
    notebooks/` compares a fresh execution with the stored outputs, so they
    must come from the same code. Tables and figures go to reports/ as in
    `run_notebooks`. Timing metadata is not stored.
    """
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    from . import reports

    os.environ.setdefault("TQDM_DISABLE", "1")
    refreshed = []
    for path in discover_notebooks(only=only):
        logger.info("executing %s in place", path.name)
        started = time.perf_counter()
        notebook = nbformat.read(path, as_version=4)
        client = NotebookClient(
            notebook,
            timeout=None,
            kernel_name=kernel_name,
            resources={"metadata": {"path": str(path.parent)}},
            record_timing=False,
        )
        try:
            client.execute()
        except CellExecutionError as error:
            raise MatchclipError(
                f"notebook {path.name} failed: {error.ename}: {error.evalue}; its stored outputs were left unchanged"
            ) from error
        for cell in notebook.cells:
            cell.metadata.pop("execution", None)
        notebook.metadata.pop("widgets", None)
        text = nbformat.writes(notebook)
        atomic_write_text(path, text if text.endswith("\n") else text + "\n")
        logger.info("stored the outputs of %s (%.0f s)", path.name, time.perf_counter() - started)
        refreshed.append(path)

    reports.write_readme()
    return refreshed


def _parse_parameter(text: str) -> Any:
    """Parse a -p value as JSON (numbers, true/false, null, lists), else keep it as text."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m matchclip.notebooks",
        description="Execute the report notebooks into reports/executed/ and rewrite reports/README.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks with papermill")
    run.add_argument(
        "--profile",
        default=None,
        help="settings profile for every notebook (default: paper when data/psg and data/coco exist, else demo)",
    )
    run.add_argument("--only", nargs="+", default=None, metavar="NAME", help="run only these notebooks (e.g. 00 02_main_results)")
    run.add_argument(
        "-p",
        "--parameter",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="notebook parameter, e.g. -p epochs 5 (values are parsed as JSON when they can be)",
    )
    run.add_argument("--out", type=Path, default=None, help="folder of the executed notebooks (default: reports/executed)")
    run.add_argument("-v", "--verbose", action="store_true", help="log debug messages")

    refresh = commands.add_parser(
        "refresh",
        help="execute the committed notebooks in place with their default (demo) parameters, storing the "
        "outputs that `pytest --nbval notebooks/` compares against",
    )
    refresh.add_argument("--only", nargs="+", default=None, metavar="NAME", help="refresh only these notebooks")
    refresh.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    started = time.perf_counter()
    try:
        if args.command == "refresh":
            executed = refresh_notebooks(only=args.only)
        else:
            parameters = {key: _parse_parameter(value) for key, value in args.parameter}
            executed = run_notebooks(profile=args.profile, only=args.only, parameters=parameters, out_dir=args.out)
    except MatchclipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"executed {len(executed)} notebook(s) in {time.perf_counter() - started:.0f} s:")
    for path in executed:
        print(f"  {path}")
    return 0


# Helpers for the notebooks ---------------------------------------------------------------------------


class _DropMessage(logging.Filter):
    """Logging filter that drops records whose message contains `text`."""

    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record: logging.LogRecord) -> bool:
        return self.text not in record.getMessage()


def setup_notebook(level: int = logging.WARNING) -> None:
    """Configure the kernel for quiet, reproducible output: no progress bars, log records at `level` and above.

    The package's bars (matchclip.progress) read TQDM_DISABLE on every call,
    so this works even after tqdm was imported. Set TQDM_DISABLE=0 before
    the first cell to keep the bars.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")
    # tqdm.auto warns on import in a kernel without ipywidgets; its bars are disabled here anyway.
    warnings.filterwarnings("ignore", message="IProgress not found")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", force=True)
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropMessage(RANDOM_INIT_MESSAGE))


def merge_settings(overrides: Mapping[str, Any] | None = None, **named: Any) -> dict[str, Any]:
    """Merge notebook parameters into one overrides dict: `overrides` plus the named ones that are not None."""
    settings = dict(overrides or {})
    settings.update({key: value for key, value in named.items() if value is not None})
    return settings


class NotebookSession:
    """The profile, overrides and output helpers of one notebook run.

    `config` is the profile with the overrides applied; `settings` are the
    overrides themselves, recorded in each output's provenance.
    """

    def __init__(self, source: str, *, profile: str, settings: Mapping[str, Any] | None = None):
        self.source = source
        self.profile = profile
        self.settings = dict(settings or {})
        self.config = resolve_config(profile, self.settings)

        # The profile's thread count, for the cells that compute outside
        # training (attention maps, predictions). Training sets it itself.
        if self.config.threads > 0:
            import torch

            torch.set_num_threads(self.config.threads)

    def check_inputs(self, configs: Iterable[RunConfig] = ()) -> None:
        """Raise MatchclipError listing every missing input of these configurations, before any training."""
        check_inputs([self.config, *configs])

    def data_paths(self) -> tuple[Path, Path]:
        """(label file, image root) of the configuration; generates the demo data set on first use."""
        from .experiment import resolve_data_paths

        return resolve_data_paths(self.config)

    def caption(self, text: str) -> str:
        from . import reports

        return reports.caption(text, self.config)

    def table(self, frame, name: str, *, caption: str):
        """Write a table to reports/tables/ and return it for display, after its caption."""
        from IPython.display import Markdown, display

        from . import reports

        full_caption = self.caption(caption)
        reports.write_table(
            frame,
            name,
            caption=full_caption,
            provenance=reports.provenance(self.config, source=self.source, settings=self.settings),
        )
        display(Markdown(f"**{name}.** {full_caption}"))
        return frame

    def figure(self, figure, name: str, *, caption: str) -> None:
        """Write a figure to reports/figures/ and print its caption (the figure shows below the cell)."""
        from IPython.display import Markdown, display

        from . import reports

        full_caption = self.caption(caption)
        reports.save_figure(
            figure,
            name,
            caption=full_caption,
            provenance=reports.provenance(self.config, source=self.source, settings=self.settings),
        )
        display(Markdown(f"**{name}.** {full_caption}"))

    def finish(self) -> None:
        """Rewrite reports/README.md so that it lists this notebook's outputs."""
        from . import reports

        reports.write_readme()


def check_inputs(configs: Iterable[RunConfig]) -> None:
    """Raise MatchclipError listing every missing input (data, backbone weights, ResNet weights).

    The demo data set is generated here when a configuration points at its
    default location. The paper settings also run without a GPU, only
    slower, so a missing GPU only logs a warning.
    """
    problems: list[str] = []
    seen: set = set()
    needs_gpu = False
    for config in configs:
        for problem in _config_problems(config):
            if problem not in seen:
                seen.add(problem)
                problems.append(problem)
        needs_gpu = needs_gpu or (config.preset in ("base", "large", "huge") and config.device == "auto")

    if problems:
        listing = "\n".join(f"  - {problem}" for problem in problems)
        raise MatchclipError(
            f"{len(problems)} input(s) missing, nothing was trained:\n{listing}\n"
            "Or run the notebooks with profile='demo', which needs none of these."
        )
    if needs_gpu:
        import torch

        if not torch.cuda.is_available():
            logger.warning("no CUDA GPU found: the paper settings will train on the CPU, many times slower than on a GPU")


def _config_problems(config: RunConfig) -> list[str]:
    from .experiment import resolve_data_paths
    from .labels import check_dataset

    problems = _data_path_problems(config)
    if not problems:
        try:
            # Generates the demo data set when the configuration points at its default place.
            labels_path, image_root = resolve_data_paths(config)
            check_dataset(labels_path, image_root, decode=False)
        except MatchclipError as error:
            problems.append(str(error))

    if config.model == "resnet":
        problems += _resnet_weight_problems(config)
    else:
        problems += _backbone_weight_problems(config)
    return problems


def _data_path_problems(config: RunConfig) -> list[str]:
    """Missing label file and image folder, both named at once; the demo data set is generated later, so it never counts."""
    root = paths.project_root()
    labels = Path(config.labels) if config.labels else paths.real_labels_path()
    images = Path(config.images) if config.images else paths.real_image_root()
    labels = labels if labels.is_absolute() else root / labels
    images = images if images.is_absolute() else root / images
    if labels.resolve() == (paths.demo_dir() / "psg_cls_basic.json").resolve():
        return []

    problems = []
    if not labels.is_file():
        problems.append(
            f"label file {labels} not found: get psg_cls_basic.json (PSG classification starter kit, "
            f"see data/README.md) and place it at {labels}"
        )
    if not images.is_dir():
        problems.append(
            f"image folder {images} not found: run `python -m matchclip data download --labels {labels} "
            f"--out {images}` (downloads only the COCO 2017 images the label file uses)"
        )
    return problems


def _resnet_weight_problems(config: RunConfig) -> list[str]:
    if config.resnet_weights is None:
        return []
    from .baselines import imagenet_weights_path

    if config.resnet_weights == "imagenet":
        path = imagenet_weights_path(config.resnet_arch)
        if not path.is_file():
            return [
                f"ImageNet weights of {config.resnet_arch} not found at {path}; copy {path.name} from torchvision's "
                f"model zoo into {path.parent} (torchvision.models.{config.resnet_arch}(weights='DEFAULT') on a "
                "machine with internet downloads it there)"
            ]
        return []
    if not Path(config.resnet_weights).expanduser().is_file():
        return [f"ResNet weights file {config.resnet_weights} not found; pass an existing state-dict file"]
    return []


def _backbone_weight_problems(config: RunConfig) -> list[str]:
    pretrained = config.pretrained
    if pretrained is None:
        return []
    if pretrained.startswith("local-dir:"):
        folder = Path(pretrained.removeprefix("local-dir:")).expanduser()
        return [] if folder.is_dir() else [f"backbone folder {folder} (pretrained={pretrained!r}) not found"]
    if Path(pretrained).suffix:
        exists = Path(pretrained).expanduser().is_file()
        return [] if exists else [f"backbone weights file {pretrained} not found"]

    import open_clip

    from . import backbone

    tag_config = open_clip.get_pretrained_cfg(config.backbone, pretrained)
    if not tag_config:
        return [f"open_clip has no weights tagged {pretrained!r} for model {config.backbone}; see open_clip.list_pretrained()"]
    # NOTE: uses the backbone module's private offline cache lookup, so the result matches what load_backbone finds.
    if backbone._cached_tag_file(tag_config, None) is None and backbone._downloads_disabled():
        return [
            f"CLIP weights {config.backbone}/{pretrained} are not in the local cache and downloads are disabled "
            f"(HF_HUB_OFFLINE); on a machine with internet run open_clip.create_model('{config.backbone}', "
            f"pretrained='{pretrained}') to fill the cache, or pass a weights file as pretrained"
        ]
    return []


# Data summaries for 00_data ---------------------------------------------------------------------------


def split_table(labels) -> pandas.DataFrame:
    """Samples, distinct image files and labels per image of each split of a LabelFile."""
    import numpy as np
    import pandas as pd

    from .labels import SPLITS

    records = []
    for split in SPLITS:
        samples = labels.split(split)
        counts = np.array([len(sample.relations) for sample in samples]) if samples else np.zeros(0)
        labelled = labels.has_labels(split)
        records.append(
            {
                "split": split,
                "samples": len(samples),
                "image files": len({sample.file_name for sample in samples}),
                "labels": int(counts.sum()) if labelled else "none (hidden)",
                "labels per image (mean)": f"{counts.mean():.2f}" if labelled and len(counts) else "n/a",
                "labels per image (min-max)": f"{counts.min()}-{counts.max()}" if labelled and len(counts) else "n/a",
            }
        )
    return pd.DataFrame(records)


def class_count_table(labels, splits: Sequence[str] = ("train", "val")) -> pandas.DataFrame:
    """Images per predicate class and split, one row per class 0..55 (classes 0..5 are never labels)."""
    import pandas as pd

    frame = pd.DataFrame({"class_id": range(len(labels.predicate_classes)), "predicate": labels.predicate_classes})
    for split in splits:
        frame[split] = labels.class_counts(split)
    return frame


def imbalance_table(counts: "pandas.DataFrame", splits: Sequence[str] = ("train", "val")) -> pandas.DataFrame:
    """Per split: most and least frequent scored class, their ratio, and the scored classes with no label."""
    import pandas as pd

    from .classes import FIRST_SCORED_CLASS

    scored = counts[counts["class_id"] >= FIRST_SCORED_CLASS]
    records = []
    for split in splits:
        present = scored[scored[split] > 0]
        missing = scored[scored[split] == 0]["predicate"].tolist()
        largest = present.loc[present[split].idxmax()] if len(present) else None
        smallest = present.loc[present[split].idxmin()] if len(present) else None
        records.append(
            {
                "split": split,
                "scored classes with labels": f"{len(present)} of {len(scored)}",
                "most frequent": f"{largest['predicate']} ({largest[split]})" if largest is not None else "n/a",
                "least frequent": f"{smallest['predicate']} ({smallest[split]})" if smallest is not None else "n/a",
                "imbalance ratio (max/min)": f"{largest[split] / smallest[split]:.1f}" if largest is not None else "n/a",
                "scored classes missing": ", ".join(missing) if missing else "none",
            }
        )
    return pd.DataFrame(records)


if __name__ == "__main__":
    sys.exit(main())
