"""The versioned compression plan: what was done to which model, as one JSON document.

Compression writes it, export copies it into the ONNX folder as ``lrexport.json``, and
the runtime reads it to know the cache layout and the progressive schedule. A saved
compressed model is the plan plus its weights; re-tracing the source architecture and
re-applying the plan reproduces the compressed graph exactly.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrexport.config import config_from_dict, config_to_dict
from lrexport.errors import PlanError
from lrexport.util import atomic_write_text

PLAN_FORMAT = "lrexport-plan"
PLAN_VERSION = 1


@dataclass
class WeightPlan:
    """FLRC weights: the factorization, the allocator and the rank of every low-rank linear."""

    factorization: Any
    allocation: Any
    ranks: dict[str, int]
    params_kept: int
    params_total: int
    alloc_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"factorization": config_to_dict(self.factorization), "allocation": config_to_dict(self.allocation),
                "ranks": dict(self.ranks), "params_kept": self.params_kept, "params_total": self.params_total,
                "alloc_seconds": self.alloc_seconds}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WeightPlan:
        return cls(factorization=config_from_dict(d["factorization"]), allocation=config_from_dict(d["allocation"]),
                   ranks={k: int(v) for k, v in d["ranks"].items()}, params_kept=int(d["params_kept"]),
                   params_total=int(d["params_total"]), alloc_seconds=float(d.get("alloc_seconds", 0.0)))


@dataclass
class Plan:
    model: dict[str, Any]  # the Hugging Face config of the source architecture
    source: dict[str, Any]
    dtype: str = "float32"
    max_len: int = 2048
    calibration: dict[str, Any] | None = None
    weights: WeightPlan | None = None
    schedule: Any = None  # lrexport.schedule.Schedule or None
    kv: dict[str, Any] | None = None
    io: dict[str, Any] = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    version: int = PLAN_VERSION

    def to_dict(self) -> dict[str, Any]:
        from lrexport import __version__

        return {
            "format": PLAN_FORMAT, "version": self.version, "lrexport_version": __version__,
            "created": self.created, "source": self.source, "dtype": self.dtype, "max_len": self.max_len,
            "model": self.model, "calibration": self.calibration,
            "weights": self.weights.to_dict() if self.weights else None,
            "schedule": config_to_dict(self.schedule) if self.schedule is not None else None,
            "kv": self.kv, "io": self.io,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        if not isinstance(d, dict):
            raise PlanError(f"not an lrexport plan: expected a JSON object, got {type(d).__name__}")
        if d.get("format") != PLAN_FORMAT:
            raise PlanError(f"not an lrexport plan (format {d.get('format')!r})")
        if d.get("version") != PLAN_VERSION:
            raise PlanError(f"plan version {d.get('version')} is not supported (this lrexport reads {PLAN_VERSION})")
        try:
            return cls(
                model=d["model"], source=d["source"], dtype=d.get("dtype", "float32"),
                max_len=int(d.get("max_len", 2048)), calibration=d.get("calibration"),
                weights=WeightPlan.from_dict(d["weights"]) if d.get("weights") else None,
                schedule=config_from_dict(d["schedule"]) if d.get("schedule") else None,
                kv=d.get("kv"), io=d.get("io", {}), created=d.get("created", ""), version=d["version"],
            )
        except KeyError as e:
            raise PlanError(f"plan is missing the field {e}") from e

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if p.is_dir():
            p = p / "lrexport.json"
        if not p.is_file():
            raise PlanError(f"{p}: no plan file (lrexport.json)")
        try:
            return cls.from_dict(json.loads(p.read_text()))
        except json.JSONDecodeError as e:
            raise PlanError(f"{p}: invalid JSON ({e})") from e
