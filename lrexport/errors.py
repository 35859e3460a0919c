"""Error hierarchy of lrexport.

Every error a user can trigger derives from :class:`LrexportError`. Messages name the
layer, tensor or setting that was wrong, and what was expected instead.
"""

from __future__ import annotations


class LrexportError(Exception):
    """Base class of every error lrexport raises on bad input."""


class ConfigError(LrexportError, ValueError):
    """A setting is out of range or inconsistent (ratio, rank, bits, group size...)."""


class UnsupportedModelError(LrexportError):
    """The model's architecture or a feature of it is not supported."""


class ModelLoadError(LrexportError):
    """A model file or folder is missing or unreadable."""


class ShapeError(LrexportError, ValueError):
    """A tensor had the wrong shape, dtype or length."""


class PassError(LrexportError):
    """A compiler pass could not be applied to the traced graph."""


class PlanError(LrexportError):
    """A saved plan or artifact is missing, of an unknown version, or inconsistent."""


class CacheOverflowError(LrexportError, ValueError):
    """A prompt plus the tokens to generate does not fit in the cache."""


class DataError(LrexportError):
    """An evaluation or calibration data file is missing or malformed."""
