"""Command line: `python -m matchclip SUBCOMMAND --help`.

Spellings that scripts rely on (kept stable):
  data demo --out DIR
  data check --labels FILE --images DIR
  train --profile demo --labels FILE --images DIR --out DIR
  submit --check FILE
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

from .classes import NUM_CLASSES
from .config import RunConfig, profile_names, resolve_config
from .errors import MatchclipError

logger = logging.getLogger("matchclip")

# Help text of every RunConfig field that `train` exposes as an option.
SETTING_HELP = {
    "labels": "PSG label file (psg_cls_basic.json); default: the profile's",
    "images": "image root under which each file_name resolves; default: the profile's",
    "cache_dir": "folder of the feature caches; default: cache/ in the project folder",
    "out": "run folder; default: runs/<profile>-<model>-<hash of the settings>",
    "backbone": "open_clip model name, e.g. ViT-B-16 or ViT-L-14-336",
    "pretrained": "backbone weights: an open_clip tag (openai), a checkpoint file, local-dir:FOLDER, or 'none' for random weights",
    "prompt_template": "prompt per predicate; {} is replaced by the predicate name",
    "model": "what to train: matchclip, linear_probe, resnet or zero_shot",
    "preset": "model preset: base, large, huge or demo (sets backbone and head shape)",
    "hidden": "head width D",
    "mlp": "MLP width inside each transformer layer",
    "heads": "attention heads per transformer layer",
    "fusion_depth": "transformer layers over image and relation tokens",
    "readout_depth": "transformer layers over matched image tokens and cls tokens",
    "matching_blocks": "matching blocks between the two stacks",
    "cls_tokens": "learnable cls tokens (their outputs are averaged)",
    "dropout": "dropout probability in the head",
    "attention_dropout": "dropout probability of the attention weights (0 keeps the fused attention kernel on a CPU)",
    "relation_tokens": "use relation (prompt) tokens; false is the no-text-encoder ablation",
    "resnet_arch": "torchvision ResNet for --model resnet (resnet18, resnet34, resnet50)",
    "resnet_weights": "ResNet weights: imagenet, a state-dict file, or 'none'",
    "resnet_image_size": "ResNet input size in pixels",
    "epochs": "training epochs",
    "batch_size": "global batch size in images (summed over processes)",
    "lr": "peak learning rate after warmup",
    "warmup_epochs": "linear warmup length in epochs (may be fractional)",
    "weight_decay": "decoupled weight decay",
    "optimizer": "adamw (AMSGrad variant by default) or sgd",
    "momentum": "SGD momentum",
    "loss": "bce, focal, label_smoothing or asymmetric",
    "balanced": "class-balanced batches: every class with train examples in every batch",
    "augment": "none, flip (from the cache), autoaugment or randaugment (from images)",
    "logit_adjustment": "strength tau: subtract tau*log(train class frequency) from logits at evaluation; 0 disables",
    "prior_bias": "start the output biases at the log-odds of the train class frequencies, so training starts from the frequency prior",
    "seed": "seed of Python, NumPy, torch and the sampler",
    "device": "auto, cpu, cuda or cuda:N",
    "threads": "torch CPU threads while training; 0 keeps torch's default (the count changes the last bits of the results)",
    "workers": "DataLoader worker processes for image decoding",
    "eval_batch_size": "batch size in images for evaluation",
    "mask_unlabeled": "mask classes 0..5 (never labels) before taking the top 3",
}
NONE_WORDS = {"none", "null", ""}


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional_text(text: str) -> str | None:
    return None if text.lower() in NONE_WORDS else text


def add_setting_options(parser: argparse.ArgumentParser) -> None:
    """Add one option per RunConfig field, with default None so that the profile's value stays."""
    defaults = RunConfig()
    for field in dataclasses.fields(RunConfig):
        if field.name not in SETTING_HELP:
            continue
        default = getattr(defaults, field.name)
        option = "--" + field.name.replace("_", "-")
        kwargs = {"default": None, "dest": field.name}
        if isinstance(default, bool):
            kwargs.update(type=_parse_bool, metavar="BOOL")
        elif isinstance(default, int):
            kwargs.update(type=int)
        elif isinstance(default, float):
            kwargs.update(type=float)
        elif field.name in ("pretrained", "resnet_weights"):
            kwargs.update(type=_optional_text, default=argparse.SUPPRESS)
        kwargs["help"] = f"{SETTING_HELP[field.name]} (built-in default: {default})"
        parser.add_argument(option, **kwargs)
    parser.add_argument(
        "--loss-options",
        type=json.loads,
        default=None,
        dest="loss_options",
        help='loss keyword arguments as JSON, e.g. \'{"gamma": 2.0}\'',
    )


def settings_from_args(args: argparse.Namespace) -> dict:
    names = set(SETTING_HELP) | {"loss_options"}
    overrides = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    # Weight options default to "not given" (absent from args), so that an
    # explicit `none` (random weights) survives as the value None.
    for name in ("pretrained", "resnet_weights"):
        if name in vars(args):
            overrides[name] = getattr(args, name)
    return overrides


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m matchclip",
        description="MatchCLIP for PSG relation classification: data, features, training, evaluation.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    commands = parser.add_subparsers(dest="command", required=True)

    data = commands.add_parser("data", help="create, check or download data")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    demo = data_commands.add_parser("demo", help="generate the demo data set (PSG format, JPEG images)")
    demo.add_argument("--out", required=True, type=Path, help="output folder (label file plus coco/ images)")
    demo.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    demo.add_argument("--num-train", type=int, default=1000, help="train images (default: 1000)")
    demo.add_argument("--num-val", type=int, default=200, help="val images (default: 200)")
    demo.add_argument("--num-test", type=int, default=500, help="test images (default: 500, the size of the real test split)")

    check = data_commands.add_parser("check", help="validate a label file and its images, listing every problem")
    check.add_argument("--labels", required=True, type=Path, help="label file psg_cls_basic.json")
    check.add_argument("--images", required=True, type=Path, help="image root (contains train2017/, val2017/)")
    check.add_argument("--no-decode", action="store_true", help="only check that image files exist (faster)")

    download = data_commands.add_parser("download", help="download the COCO images a label file names")
    download.add_argument("--labels", required=True, type=Path, help="label file psg_cls_basic.json")
    download.add_argument("--out", required=True, type=Path, help="image root to fill (e.g. data/coco)")
    download.add_argument("--workers", type=int, default=16, help="parallel downloads (default: 16)")
    download.add_argument("--base-url", default=None, help="image server (default: the official COCO server)")
    download.add_argument("--timeout", type=float, default=60.0, help="per-request timeout in seconds (default: 60)")
    download.add_argument("--retries", type=int, default=3, help="retries per image after the first attempt (default: 3)")

    profile_help = f"settings bundle: {', '.join(profile_names())}; any option below overrides it"

    extract = commands.add_parser("extract", help="encode splits into the feature cache")
    extract.add_argument("--profile", default="demo", help=profile_help + " (default: demo)")
    extract.add_argument("--splits", nargs="+", default=["train", "val", "test"], help="splits (default: all)")
    extract.add_argument("--views", nargs="+", default=["plain"], help="plain and/or flip (default: plain)")
    add_setting_options(extract)

    train = commands.add_parser("train", help="train a model; prints the best val mean recall@3")
    train.add_argument("--profile", default="demo", help=profile_help + " (default: demo)")
    add_setting_options(train)

    evaluate = commands.add_parser("evaluate", help="metrics and per-class recall of a trained run")
    evaluate.add_argument("--run", required=True, type=Path, help="run folder (contains best.pt)")
    evaluate.add_argument("--split", default="val", help="labelled split to score (default: val)")
    evaluate.add_argument("--labels", type=Path, default=None, help="override the run's label file")
    evaluate.add_argument("--images", type=Path, default=None, help="override the run's image root")
    evaluate.add_argument("--per-class", action="store_true", help="also print the per-class recall table")

    predict = commands.add_parser("predict", help="top-3 relations with scores for your own images")
    predict.add_argument("images", nargs="+", type=Path, help="image files")
    predict.add_argument("--run", required=True, type=Path, help="run folder (contains best.pt)")
    predict.add_argument("--k", type=int, default=3, help="relations per image (default: 3)")
    predict.add_argument("--json", action="store_true", help="print JSON instead of text")

    submit = commands.add_parser("submit", help="write or check a result.txt submission")
    submit.add_argument("--run", type=Path, default=None, help="run folder whose best model predicts the test split")
    submit.add_argument("--out", type=Path, default=Path("result.txt"), help="submission file (default: result.txt)")
    submit.add_argument("--check", type=Path, default=None, help="only validate this submission file")
    submit.add_argument("--lines", type=int, default=500, help="expected lines when checking (default: 500)")
    submit.add_argument("--labels", type=Path, default=None, help="override the run's label file")
    submit.add_argument("--images", type=Path, default=None, help="override the run's image root")
    return parser


def _config_from_args(args) -> RunConfig:
    return resolve_config(args.profile, settings_from_args(args))


def run_data(args) -> int:
    if args.data_command == "demo":
        from .demo import generate_demo_dataset

        path = generate_demo_dataset(
            args.out, seed=args.seed, num_train=args.num_train, num_val=args.num_val, num_test=args.num_test
        )
        print(f"demo data set written: labels {path}, images {Path(args.out) / 'coco'}")
        return 0
    if args.data_command == "check":
        from .labels import check_dataset

        labels = check_dataset(args.labels, args.images, decode=not args.no_decode)
        counts = ", ".join(f"{split} {len(labels.split(split))}" for split in ("train", "val", "test"))
        print(f"OK: {args.labels} ({counts} samples) with images under {args.images}")
        return 0
    from .download import download_images

    options = {"workers": args.workers, "timeout": args.timeout, "retries": args.retries}
    if args.base_url:
        options["base_url"] = args.base_url
    summary = download_images(args.labels, args.out, **options)
    print(f"downloaded {summary.downloaded}, already present {summary.skipped}, failed {len(summary.failed)}")
    for file_name, reason in summary.failed[:10]:
        print(f"  failed: {file_name}: {reason}")
    return 1 if summary.failed else 0


def run_extract(args) -> int:
    from .distributed import init_distributed
    from .experiment import prepare

    experiment = prepare(_config_from_args(args))
    # Under torchrun every rank encodes its share of the shards into one cache.
    context = init_distributed(experiment.device)
    experiment.device = context.rank_device(experiment.device)
    for split in args.splits:
        for view in args.views:
            cache = experiment.cache(split, view, context=context)
            if context.is_main:
                print(f"{split}/{view}: {cache.tokens.shape[0]} images, tokens {tuple(cache.tokens.shape[1:])} -> {cache.root}")
    if context.is_main:
        experiment.relation_embeddings()
    context.barrier()
    return 0


def run_train(args) -> int:
    from .train import PRIMARY_METRIC, train

    result = train(_config_from_args(args))
    print(f"run folder: {result.run_dir}")
    print(f"best val {PRIMARY_METRIC}: {result.best_score:.4f} (epoch {result.best_epoch + 1})")
    return 0


def run_evaluate(args) -> int:
    from .inference import evaluate_run

    overrides = {"labels": args.labels and str(args.labels), "images": args.images and str(args.images)}
    metrics, table = evaluate_run(args.run, split=args.split, **overrides)
    for key, value in metrics.items():
        print(f"{args.split} {key}: {value:.4f}" if isinstance(value, float) else f"{args.split} {key}: {value}")
    if args.per_class:
        print(table.to_string(index=False))
    return 0


def run_predict(args) -> int:
    from .inference import load_run, predict_images

    results = predict_images(load_run(args.run), args.images, k=args.k)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for result in results:
        relations = ", ".join(f"{r['predicate']} ({r['score']:.3f})" for r in result["relations"])
        print(f"{result['image']}: {relations}")
    return 0


def run_submit(args) -> int:
    from .submission import read_submission

    if args.check is not None:
        predictions = read_submission(args.check, expected_lines=args.lines)
        print(f"OK: {args.check} has {len(predictions)} lines of {predictions.shape[1]} distinct class ids in 0..{NUM_CLASSES - 1}")
        return 0
    if args.run is None:
        raise MatchclipError("submit needs --run RUN_FOLDER to predict the test split, or --check FILE to validate one")
    from .inference import write_test_submission

    overrides = {"labels": args.labels and str(args.labels), "images": args.images and str(args.images)}
    path = write_test_submission(args.run, args.out, **overrides)
    predictions = read_submission(path, expected_lines=None)
    print(f"wrote {path}: {len(predictions)} lines of 3 class ids")
    return 0


HANDLERS = {
    "data": run_data,
    "extract": run_extract,
    "train": run_train,
    "evaluate": run_evaluate,
    "predict": run_predict,
    "submit": run_submit,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The package reports progress at INFO; other libraries (open_clip logs
    # every model build at INFO) speak only from WARNING unless --verbose.
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        logger.setLevel(logging.INFO)
    try:
        return HANDLERS[args.command](args)
    except MatchclipError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
