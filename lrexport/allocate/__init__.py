"""Rank allocators behind one interface: :func:`allocate(cfg, ctx) <allocate>`."""

from __future__ import annotations

from lrexport.allocate.flrc import Flrc
from lrexport.allocate.palu import PaluFisher
from lrexport.allocate.registry import Allocation, AllocContext, ProjectionInfo, allocate
from lrexport.allocate.strs import Strs
from lrexport.allocate.uniform import Uniform

__all__ = ["AllocContext", "Allocation", "Flrc", "PaluFisher", "ProjectionInfo", "Strs", "Uniform", "allocate"]
