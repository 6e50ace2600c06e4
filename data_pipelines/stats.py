"""Pipeline statistics: what was packed, skipped and repaired, and packing efficiency;
and the per-packer record outcomes that stop a run whose data cannot do useful work."""
from __future__ import annotations

import collections
import dataclasses
from typing import Mapping, Optional

from data_pipelines.records import UnusableDataError


@dataclasses.dataclass(frozen=True)
class PipelineStats:
    documents: int  # documents packed (a split text document counts once)
    skipped: dict  # reason -> records skipped
    repaired: dict  # repair -> records fixed and kept (e.g. grayscale_to_rgb)
    split_text_documents: int  # text documents cut into chunks across rows
    batches: int
    rows: int
    images: int  # images packed
    nonpad_tokens: int
    row_tokens: int  # rows * seq_len

    @property
    def packing_efficiency(self) -> float:
        """Non-pad fraction of all packed positions."""
        return self.nonpad_tokens / self.row_tokens if self.row_tokens else 0.0

    @property
    def records_seen(self) -> int:
        """Every record read: packed or skipped (each counted exactly once)."""
        return self.documents + sum(self.skipped.values())

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> "PipelineStats":
        def by_prefix(prefix):
            return {k[len(prefix):]: int(v) for k, v in sorted(counts.items())
                    if k.startswith(prefix)}

        return cls(documents=int(counts.get("documents", 0)),
                   skipped=by_prefix("skipped/"), repaired=by_prefix("repaired/"),
                   split_text_documents=int(counts.get("split_text_documents", 0)),
                   batches=int(counts.get("batches", 0)), rows=int(counts.get("rows", 0)),
                   images=int(counts.get("images", 0)),
                   nonpad_tokens=int(counts.get("nonpad_tokens", 0)),
                   row_tokens=int(counts.get("row_tokens", 0)))

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["packing_efficiency"] = self.packing_efficiency
        out["records_seen"] = self.records_seen
        return out


def log_counts(counts: Mapping[str, int]) -> dict[str, int]:
    """Summed batch counters -> the cumulative counts a trainer logs:
    data_records_read (packed + skipped), data_skipped_<reason>, data_repaired_<repair>,
    data_deferred_image_capacity (rows that waited a batch for image capacity), and
    per mixture entry data_<name>_records_read, data_<name>_skipped_<reason>."""
    out = collections.Counter({"data_records_read": int(counts.get("documents", 0))})
    for key, n in counts.items():
        kind, _, name = key.partition("/")
        if kind in ("skipped", "repaired", "deferred"):  # deferred: rows waiting a batch
            out[f"data_{kind}_{name}"] = int(n)
            if kind == "skipped":
                out["data_records_read"] += int(n)
        elif kind == "source":  # source/<entry>/documents | source/<entry>/skipped/<reason>
            entry, _, what = name.partition("/")
            out[f"data_{entry}_records_read"] += int(n)
            if what.startswith("skipped/"):
                out[f"data_{entry}_skipped_{what[len('skipped/'):]}"] = int(n)
    return dict(out)


@dataclasses.dataclass(frozen=True)
class UsabilityLimits:
    """When a packer gives up on its records (data_config's fields of the same names)."""

    max_records_without_usable: int  # stop after this many records and none usable; 0 = off
    max_bad_fraction: float  # stop when more of the last window was skipped; 1 = off
    bad_fraction_window: int  # records in that window

    @classmethod
    def from_config(cls, data) -> "UsabilityLimits":
        return cls(max_records_without_usable=data.max_records_without_usable,
                   max_bad_fraction=data.max_bad_fraction,
                   bad_fraction_window=data.bad_fraction_window)


TOP_REASONS = 5  # skip reasons named in an UnusableDataError


class RecordOutcomes:
    """Every record one packer read: usable or skipped (by reason, with the first
    example of each reason), plus the outcomes of the last `bad_fraction_window`
    records as a bit register, so `check` is O(1) per record, exact, and its state
    is a short hex string.
    """

    def __init__(self, limits: Optional[UsabilityLimits] = None):
        self.limits = limits
        self.read = 0
        self.usable = 0
        self.skipped: collections.Counter = collections.Counter()
        self.examples: dict[str, str] = {}  # reason -> detail of its first record
        self._new_examples: dict[str, str] = {}  # first seen since take_new_examples
        self._size = limits.bad_fraction_window if limits else 0
        self._window = 0  # bit i: the record read i records ago was skipped
        self._bad_in_window = 0

    def add_usable(self) -> None:
        self._push(False)
        self.usable += 1

    def add_skipped(self, reason: str, detail: str) -> None:
        self._push(True)
        self.skipped[reason] += 1
        if reason not in self.examples:
            self.examples[reason] = self._new_examples[reason] = detail

    def _push(self, bad: bool) -> None:
        self.read += 1
        if not self._size:
            return
        leaving = (self._window >> (self._size - 1)) & 1
        self._window = ((self._window << 1) | bad) & ((1 << self._size) - 1)
        self._bad_in_window += bad - leaving

    def take_new_examples(self) -> dict[str, str]:
        """Examples of reasons first seen since the previous call."""
        new, self._new_examples = self._new_examples, {}
        return new

    # --- giving up ------------------------------------------------------------------

    def check(self) -> None:
        """Raises UnusableDataError when the records read so far break a limit."""
        limits = self.limits
        if limits is None:
            return
        if (limits.max_records_without_usable and not self.usable
                and self.read >= limits.max_records_without_usable):
            raise UnusableDataError(self._report(
                "max_records_without_usable", limits.max_records_without_usable,
                f"none of the {self.read} records read was usable"))
        if (self.read >= self._size
                and self._bad_in_window > limits.max_bad_fraction * self._size):
            raise UnusableDataError(self._report(
                "max_bad_fraction", limits.max_bad_fraction,
                f"{self._bad_in_window} of the last {self._size} records read were skipped "
                f"({self._bad_in_window / self._size:.1%}; data.bad_fraction_window="
                f"{self._size})"))

    def _report(self, field: str, value, finding: str) -> str:
        reasons = sorted(self.skipped.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS]
        lines = [f"data.{field}={value} stopped the input pipeline: {finding}. "
                 f"Records read: {self.read}, usable: {self.usable}, skipped: "
                 f"{sum(self.skipped.values())}. Most frequent skip reasons:"]
        lines += [f"  {reason}: {n} records, e.g. {self.examples.get(reason) or '(no detail)'}"
                  for reason, n in reasons]
        lines.append(f"Fix or remove those records, or relax data.{field}.")
        return "\n".join(lines)

    # --- state ----------------------------------------------------------------------

    def get_state(self) -> dict:
        return {"read": self.read, "usable": self.usable, "skipped": dict(self.skipped),
                "examples": dict(self.examples), "new_examples": dict(self._new_examples),
                "window": format(self._window, "x")}

    def set_state(self, state: dict) -> None:
        self.read, self.usable = int(state["read"]), int(state["usable"])
        self.skipped = collections.Counter({k: int(v) for k, v in state["skipped"].items()})
        self.examples = dict(state["examples"])
        self._new_examples = dict(state["new_examples"])
        self._window = int(state["window"], 16) & ((1 << self._size) - 1)
        self._bad_in_window = self._window.bit_count()
