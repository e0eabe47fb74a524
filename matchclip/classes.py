"""The 56 PSG predicate classes and the class ranges the metric uses."""

from __future__ import annotations

# Index i is predicate class i of the PSG classification label file.
PREDICATE_CLASSES: tuple[str, ...] = (
    "over",
    "in front of",
    "beside",
    "on",
    "in",
    "attached to",
    "hanging from",
    "on back of",
    "falling off",
    "going down",
    "painted on",
    "walking on",
    "running on",
    "crossing",
    "standing on",
    "lying on",
    "sitting on",
    "flying over",
    "jumping over",
    "jumping from",
    "wearing",
    "holding",
    "carrying",
    "looking at",
    "guiding",
    "kissing",
    "eating",
    "drinking",
    "feeding",
    "biting",
    "catching",
    "picking",
    "playing with",
    "chasing",
    "climbing",
    "cleaning",
    "playing",
    "touching",
    "pushing",
    "pulling",
    "opening",
    "cooking",
    "talking to",
    "throwing",
    "slicing",
    "driving",
    "riding",
    "parked on",
    "driving on",
    "about to hit",
    "kicking",
    "swinging",
    "entering",
    "exiting",
    "enclosing",
    "leaning on",
)

NUM_CLASSES = len(PREDICATE_CLASSES)

# Classes 0..5 are geometric predicates ("over", "beside", ...) that never
# occur as labels of the classification task; the metric averages over 6..55.
FIRST_SCORED_CLASS = 6
SCORED_CLASSES: tuple[int, ...] = tuple(range(FIRST_SCORED_CLASS, NUM_CLASSES))
UNLABELED_CLASSES: tuple[int, ...] = tuple(range(FIRST_SCORED_CLASS))

DEFAULT_PROMPT_TEMPLATE = "One relation in the photo is {}."
