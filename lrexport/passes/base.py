"""The pass contract: a pass edits a :class:`TracedGraph` in place and says what it did."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass
class PassResult:
    """How many places a pass changed, and why it left the others alone."""

    name: str
    changed: int = 0
    skipped: dict[str, str] = field(default_factory=dict)
    unmatched: str | None = None  # set when the pass matched nothing at all

    @property
    def modified(self) -> bool:
        return self.changed > 0

    def summary(self) -> str:
        s = f"{self.name}: changed {self.changed} place(s)"
        if self.skipped:
            s += f", left {len(self.skipped)} unchanged"
        if self.unmatched:
            s += f" -- matched nothing: {self.unmatched}"
        return s

    def log(self) -> PassResult:
        log.info(self.summary())
        for target, why in list(self.skipped.items())[:20]:
            log.debug("  %s: %s", target, why)
        return self
