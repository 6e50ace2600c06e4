"""Pipeline statistics: what was packed, skipped and repaired, and packing efficiency."""
from __future__ import annotations

import dataclasses
from typing import Mapping


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
