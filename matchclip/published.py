"""Numbers published in the MatchCLIP report (Shen, "MatchCLIP: Viewing Object-Relation
Classification As A Matching Problem", NTU CE7454 PSG classification challenge, 2022).

Scores are mean recall@3 in percent: "eval" is the val split, "test" the
challenge's test split (leaderboard). The row keys match the row keys of
`matchclip.grid`, so a table can put our result and the published one side
by side.
"""

from __future__ import annotations

from dataclasses import dataclass

SOURCE = (
    "J. Shen, MatchCLIP: Viewing Object-Relation Classification As A Matching Problem "
    "(PSG classification challenge report, 2022)"
)


@dataclass(frozen=True)
class PublishedScore:
    """Published mean recall@3 (percent) of one model; None where the report gives no value."""

    label: str
    eval: float | None
    test: float | None = None


# Table 1: variant shapes and parameter counts as printed. "28T" means 28
# thousand parameters: the linear probe counts only the final linear layer.
TABLE1: dict[str, dict[str, str]] = {
    "resnet": {
        "Model": "ResNet50", "Image size": "224", "Patch size": "/", "Transformer layers": "/",
        "Matching block": "/", "Hidden size D": "/", "MLP size": "/", "Heads": "/", "Params": "25M",
    },
    "linear_probe": {
        "Model": "Linear probe CLIP-B/16", "Image size": "224", "Patch size": "16", "Transformer layers": "/",
        "Matching block": "/", "Hidden size D": "/", "MLP size": "/", "Heads": "/", "Params": "28T*",
    },
    "base": {
        "Model": "MatchCLIP-Base", "Image size": "224", "Patch size": "16", "Transformer layers": "3",
        "Matching block": "1", "Hidden size D": "512", "MLP size": "1024", "Heads": "8", "Params": "17M",
    },
    "large": {
        "Model": "MatchCLIP-Large", "Image size": "336", "Patch size": "14", "Transformer layers": "3",
        "Matching block": "1", "Hidden size D": "1024", "MLP size": "4096", "Heads": "16", "Params": "101M",
    },
    "huge": {
        "Model": "MatchCLIP-Huge", "Image size": "336", "Patch size": "14", "Transformer layers": "3",
        "Matching block": "1", "Hidden size D": "1600", "MLP size": "4096", "Heads": "16", "Params": "186M",
    },
}

# Table 2: main results. The report has no zero-shot CLIP row.
TABLE2: dict[str, PublishedScore] = {
    "resnet": PublishedScore("ResNet50", 15.49, 15.28),
    "linear_probe": PublishedScore("Linear probe CLIP-B/16", 23.03, 22.87),
    "zero_shot": PublishedScore("Zero-shot CLIP-B/16", None, None),
    "base": PublishedScore("MatchCLIP-Base", 27.03, 27.35),
    "large": PublishedScore("MatchCLIP-Large", 28.52, 29.09),
    "large-balanced": PublishedScore("MatchCLIP-Large\u2020", 31.90, 32.12),
    "huge-balanced": PublishedScore("MatchCLIP-Huge\u2020", 33.21, 34.60),
}

# Table 3: ablations of MatchCLIP-Large on eval; deltas are printed against the "large" row.
TABLE3: dict[str, float] = {
    "large": 28.52,
    "large-depth": 27.40,
    "large-matching": 27.95,
    "large-cls": 26.69,
    "large-balanced": 31.90,
    "huge": 30.71,
    "huge-balanced": 33.21,
}

# Table 4: without relation (text) tokens; each "no text" row is compared with the row above it.
TABLE4: dict[str, float] = {
    "large-balanced": 31.90,
    "large-balanced-no-text": 31.73,
    "huge-balanced": 33.21,
    "huge-balanced-no-text": 33.06,
}


def published_eval(key: str, table: str = "table2") -> float | None:
    """Published eval mean recall@3 of a grid row key in a table, or None when the report has none."""
    if table == "table2":
        score = TABLE2.get(key)
        return None if score is None else score.eval
    if table == "table3":
        return TABLE3.get(key)
    if table == "table4":
        return TABLE4.get(key)
    raise KeyError(f"unknown published table {table!r}; choose table2, table3 or table4")
