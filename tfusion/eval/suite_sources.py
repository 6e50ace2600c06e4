"""Which data each evaluation suite can score: one table for the suites themselves
(tfusion/eval/suites.py: `all` and each suite's own check) and for the trainer's
start-up validation of train.final_eval_suite (tfusion/train/validate.py). Imports
nothing, so the trainer's config check stays free of the data pipeline."""
from __future__ import annotations

SHAPES_WORLD = ("shapes", "shapes_edit")  # sources the shapes detector reads

# Suite -> the data.source values it scores; None = any data. `fid` scores other data
# only when its caller passes a feature_fn (e.g. Inception), which a config cannot name.
SUITE_SOURCES: dict[str, tuple[str, ...] | None] = {
    "text": None,
    "shapes": SHAPES_WORLD,
    "fid": SHAPES_WORLD,
    "digits": ("digits",),
    "edit": ("shapes_edit",),
}
SUITES = tuple(SUITE_SOURCES)


def applies(suite: str, source: str) -> bool:
    wanted = SUITE_SOURCES[suite]
    return wanted is None or source in wanted


def source_problem(suite: str, source: str) -> str:
    """Why `suite` cannot score data.source `source`; "" if it can."""
    if applies(suite, source):
        return ""
    return f"the {suite!r} suite reads data.source in {SUITE_SOURCES[suite]}, not {source!r}"
