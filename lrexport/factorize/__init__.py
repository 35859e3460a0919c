"""Factorization methods, one typed config each, dispatched by :func:`factorize`."""

from __future__ import annotations

from lrexport.factorize.asvd import Asvd
from lrexport.factorize.registry import Decomposition, factorize
from lrexport.factorize.svd import PlainSvd
from lrexport.factorize.whiten import FisherWhitenSvd, WhitenSvd

__all__ = ["Asvd", "Decomposition", "FisherWhitenSvd", "PlainSvd", "WhitenSvd", "factorize"]
