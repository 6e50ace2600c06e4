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


# Held-out records a suite reads at the trainer's options (EvalOptions' defaults):
# the eval split (data.eval_examples records) must hold at least this many.
SUITE_HELDOUT_RECORDS: dict[str, int] = {"shapes": 64, "fid": 256}


def heldout_problem(suite: str, source: str, eval_examples: int) -> str:
    """Why the eval split is too small for `suite` (or for any suite of 'all' that
    applies to `source`); "" if it is not."""
    suites = [s for s in SUITES if applies(s, source)] if suite == "all" else [suite]
    for name in suites:
        need = SUITE_HELDOUT_RECORDS.get(name, 0)
        if eval_examples < need:
            return (f"{eval_examples} held-out records, but the {name!r} suite reads {need}")
    return ""
