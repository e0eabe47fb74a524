"""Evaluation, prediction on a user's images, and test-set submission from a trained run."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from .classes import PREDICATE_CLASSES
from .config import RunConfig
from .errors import MatchclipError
from .experiment import Experiment, prepare
from .metrics import evaluate_scores, per_class_recall, top_k
from .train import ModelInputs, adjust_logits, build_dataset, predict_scores

logger = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """A finished run's model in eval mode with the inputs it was trained on."""

    run_dir: Path
    experiment: Experiment
    model: torch.nn.Module | None
    inputs: ModelInputs
    checkpoint: dict

    @property
    def config(self) -> RunConfig:
        return self.experiment.config

    def scores(self, logits: np.ndarray) -> np.ndarray:
        return adjust_logits(logits, self.experiment.targets("train"), self.config.logit_adjustment)


def load_run(run_dir: str | Path, *, device: str | None = None, **overrides) -> TrainedRun:
    """Load the best checkpoint of a run folder; `overrides` replace data paths or the device."""
    run_dir = Path(run_dir)
    best = run_dir / "best.pt"
    if not best.is_file():
        raise MatchclipError(
            f"no best.pt in run folder {run_dir}; train first with "
            f"`python -m matchclip train --out {run_dir}` or pass the folder of a finished run"
        )
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    settings = dict(checkpoint["config"])
    settings.update({key: value for key, value in overrides.items() if value is not None})
    if device is not None:
        settings["device"] = device
    experiment = prepare(RunConfig.from_dict(settings, source=f"{best}"))

    model = None
    if checkpoint["model"] is not None:
        model = experiment.build_module(**checkpoint["shape"])
        model.load_state_dict(checkpoint["model"])
        model.to(experiment.device).eval()
    return TrainedRun(run_dir, experiment, model, ModelInputs(experiment), checkpoint)


def split_scores(run: TrainedRun, split: str) -> np.ndarray:
    """Scores [N, C] of every sample of a split, after the run's logit adjustment."""
    experiment = run.experiment
    if run.model is None:
        from .baselines import zero_shot_scores

        cache = experiment.cache(split)
        return np.asarray(
            zero_shot_scores(np.asarray(cache.embeddings, dtype=np.float32), experiment.relation_embeddings())
        )
    dataset = build_dataset(experiment, split, train=False, context=None)
    logits = predict_scores(run.model, run.inputs, dataset, batch_size=run.config.eval_batch_size)
    return run.scores(logits)


def evaluate_run(run_dir: str | Path, *, split: str = "val", **overrides) -> tuple[dict, pd.DataFrame]:
    """Metrics dict and per-class recall table of a run on a labelled split."""
    run = load_run(run_dir, **overrides)
    if not run.experiment.labels.has_labels(split):
        raise MatchclipError(f"split {split!r} of {run.experiment.labels_path} has no labels; use val or train")
    scores = split_scores(run, split)
    targets = run.experiment.targets(split)
    mask = run.config.mask_unlabeled
    return evaluate_scores(scores, targets, k=3, mask_unlabeled=mask), per_class_recall(
        scores, targets, k=3, mask_unlabeled=mask
    )


def predict_images(run: TrainedRun, image_paths: Sequence[str | Path], *, k: int = 3) -> list[dict]:
    """Top-k relations with sigmoid scores for image files, one dict per image."""
    from .images import load_image

    experiment = run.experiment
    if experiment.config.model == "resnet":
        from .train import image_transform

        transform = image_transform(experiment, train=False)
    else:
        transform = experiment.load_backbone().preprocess

    results = []
    for path in image_paths:
        image = transform(load_image(path)).unsqueeze(0)
        with torch.no_grad():
            if run.model is None:
                from .baselines import zero_shot_scores

                _, embedding = experiment.load_backbone().encode_images(image.to(experiment.device))
                scores = np.asarray(zero_shot_scores(embedding.cpu().numpy(), experiment.relation_embeddings()))
                probabilities = scores
            else:
                logits = run.inputs.logits(run.model, {"images": image}).float().cpu().numpy()
                scores = run.scores(logits)
                probabilities = 1.0 / (1.0 + np.exp(-logits))
        top = top_k(scores, k=k, mask_unlabeled=run.config.mask_unlabeled)[0]
        results.append(
            {
                "image": str(path),
                "relations": [
                    {"class_id": int(c), "predicate": PREDICATE_CLASSES[int(c)], "score": float(probabilities[0, c])}
                    for c in top
                ],
            }
        )
    return results


def write_test_submission(run_dir: str | Path, out: str | Path, **overrides) -> Path:
    """Write result.txt with the top-3 class ids of every test image of a run's label file."""
    from .submission import write_submission

    run = load_run(run_dir, **overrides)
    scores = split_scores(run, "test")
    predictions = top_k(scores, k=3, mask_unlabeled=run.config.mask_unlabeled)
    expected = len(run.experiment.labels.split("test"))
    path = write_submission(out, predictions, expected_lines=expected)
    logger.info("wrote %d predictions to %s", expected, path)
    return path


def run_summary(run_dir: str | Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text(encoding="utf-8"))
