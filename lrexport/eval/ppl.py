"""Perplexity over non-overlapping windows of a text (WikiText-2 test by default).

The whole text is tokenized once without special tokens, cut from the start into
non-overlapping windows of ``window`` tokens (a trailing partial window is dropped), and
every next-token prediction inside a window is scored: ``window - 1`` targets per window,
no BOS and no context carried over between windows. ``ppl = exp(mean NLL)`` over all
targets of the first ``num_windows`` windows.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from lrexport.errors import ConfigError, DataError, ShapeError
from lrexport.eval.data import wikitext_test_text
from lrexport.util import progress

if TYPE_CHECKING:
    from lrexport.eval import LogitsFn

log = logging.getLogger(__name__)


@dataclass
class PplResult:
    """A perplexity measurement.

    ``tokens`` is the number of scored targets (``windows * (window - 1)``).
    """

    ppl: float
    nll_mean: float
    tokens: int
    windows: int
    window: int


def _positive_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_logits(logits: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """``logits`` as float32, checked to be ``[B, S, V]`` for ``input_ids`` of shape ``[B, S]``."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(input_ids.shape):
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ShapeError(f"logits_fn returned {shape}, expected a tensor [B, S, V] with "
                         f"[B, S] = {tuple(input_ids.shape)}")
    return logits.float()


def perplexity(logits_fn: LogitsFn, tokenizer: Any, text: str | None = None, *, window: int = 512,
               num_windows: int | None = 40, batch_size: int = 4) -> PplResult:
    """Perplexity of ``logits_fn`` on ``text`` (default: WikiText-2 raw test, as is).

    Args:
        logits_fn: ``input_ids [B, S] int64 -> logits [B, S, V]``.
        tokenizer: a Hugging Face tokenizer; the text is encoded with ``add_special_tokens=False``.
        text: the text to score; None reads :func:`lrexport.eval.data.wikitext_test_text`.
        window: tokens per window (>= 2); each window gives ``window - 1`` targets.
        num_windows: how many windows from the start to score; None scores all full windows.
        batch_size: windows per ``logits_fn`` call.
    """
    _positive_int("window", window, 2)
    if num_windows is not None:
        _positive_int("num_windows", num_windows, 1)
    _positive_int("batch_size", batch_size, 1)
    if text is None:
        text = wikitext_test_text()
    ids = list(tokenizer(text, add_special_tokens=False).input_ids)
    available = len(ids) // window
    if available == 0:
        raise DataError(f"the text has {len(ids)} tokens, shorter than one window of {window} tokens; "
                        "pass a longer text or a smaller window")
    n = available if num_windows is None else min(num_windows, available)
    if num_windows is not None and num_windows > available:
        log.warning("only %d windows of %d tokens in the text (%d asked); scoring %d", available, window,
                    num_windows, n)
    windows = torch.tensor(ids[: n * window], dtype=torch.long).view(n, window)
    nll_sum = 0.0
    starts = range(0, n, batch_size)
    for start in progress(starts, desc="perplexity", total=len(starts)):
        batch = windows[start:start + batch_size]
        with torch.no_grad():
            logits = check_logits(logits_fn(batch), batch)
        for row in range(batch.shape[0]):
            nll = F.cross_entropy(logits[row, :-1], batch[row, 1:], reduction="none")
            nll_sum += float(nll.double().sum())
    tokens = n * (window - 1)
    nll_mean = nll_sum / tokens
    result = PplResult(ppl=math.exp(nll_mean), nll_mean=nll_mean, tokens=tokens, windows=n, window=window)
    log.info("perplexity %.4f over %d windows of %d tokens", result.ppl, n, window)
    return result
