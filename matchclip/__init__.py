"""MatchCLIP: image-level relation classification on PSG as image-relation matching.

Typical use:

    from matchclip import resolve_config, train
    result = train(resolve_config("demo", {"epochs": 10}))
    print(result.best_score)

Submodules: labels, images, download, demo (data); backbone, cache (frozen CLIP
features); model, baselines (trained heads); sampler, losses, train (training);
metrics, submission, inference (evaluation); cli (command line).
"""

from .classes import NUM_CLASSES, PREDICATE_CLASSES, SCORED_CLASSES
from .config import RunConfig, load_profile, resolve_config
from .errors import MatchclipError

__version__ = "0.1.0"

__all__ = [
    "NUM_CLASSES",
    "PREDICATE_CLASSES",
    "SCORED_CLASSES",
    "MatchclipError",
    "RunConfig",
    "load_profile",
    "resolve_config",
    "train",
    "load_run",
    "evaluate_run",
    "predict_images",
]


def __getattr__(name: str):
    # Heavy entry points import torch and open_clip; load them on first use so
    # `import matchclip` stays fast for the command line's --help.
    if name == "train":
        from .train import train

        return train
    if name in ("load_run", "evaluate_run", "predict_images"):
        from . import inference

        return getattr(inference, name)
    raise AttributeError(f"module 'matchclip' has no attribute {name!r}")
