"""Zero-shot multiple-choice accuracy by log-likelihood (lm-evaluation-harness style).

Each choice of an item becomes one request ``(context, continuation)``; the context and
the continuation are tokenized separately (no special tokens) and their ids concatenated,
so the continuation tokens are exactly the scored ones. The prediction is the choice with
the highest summed log-likelihood (``acc``) or the highest log-likelihood per character
of the choice text (``acc_norm``, as lm-eval). With tokenizers that prefix a space to every
encoded string (SentencePiece "legacy" mode) separate encoding may add a lone space token
to the continuation; byte-level BPE tokenizers (Llama 3 style) are unaffected.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from lrexport.errors import ConfigError
from lrexport.eval.data import TASK_LOADERS, load_task
from lrexport.eval.ppl import check_logits
from lrexport.util import progress

if TYPE_CHECKING:
    from lrexport.eval import LogitsFn

log = logging.getLogger(__name__)


def loglikelihoods(logits_fn: LogitsFn, requests: list[tuple[list[int], list[int]]], *, batch_size: int = 16,
                   max_len: int = 1024, pad_id: int = 0) -> list[float]:
    """Sum of log-probabilities of each continuation given its context.

    Args:
        logits_fn: ``input_ids [B, S] int64 -> logits [B, S, V]`` of a causal model.
        requests: ``(context_ids, continuation_ids)`` pairs; both non-empty.
        batch_size: rows per ``logits_fn`` call. Requests are sorted by length so that a
            batch holds rows of similar length, right-padded with ``pad_id``.
        max_len: the longest model input; ``context + continuation`` is truncated from the
            left to ``max_len + 1`` tokens (the last token is only a target).
        pad_id: the token id used for right padding (it never affects scored positions).

    Returns:
        One float per request, in the order of ``requests``.
    """
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    rows: list[tuple[list[int], int]] = []  # (input ids, number of continuation tokens)
    for i, (ctx, cont) in enumerate(requests):
        if not ctx or not cont:
            raise ConfigError(f"request {i} has an empty {'context' if not ctx else 'continuation'}; "
                              "both must hold at least one token (prepend BOS to an empty context)")
        if len(cont) > max_len:
            raise ConfigError(f"request {i}: continuation of {len(cont)} tokens does not fit max_len={max_len}")
        seq = (list(ctx) + list(cont))[-(max_len + 1):]
        rows.append((seq, len(cont)))
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    out = [0.0] * len(rows)
    chunks = range(0, len(order), batch_size)
    for start in progress(chunks, desc="loglikelihood", total=len(chunks)):
        idx = order[start:start + batch_size]
        width = max(len(rows[i][0]) for i in idx) - 1
        batch = torch.full((len(idx), width), pad_id, dtype=torch.long)
        for r, i in enumerate(idx):
            seq = rows[i][0]
            batch[r, : len(seq) - 1] = torch.tensor(seq[:-1], dtype=torch.long)
        with torch.no_grad():
            logits = check_logits(logits_fn(batch), batch)
        for r, i in enumerate(idx):
            seq, n_cont = rows[i]
            end = len(seq) - 1  # input length; positions end-n_cont .. end-1 predict the continuation
            targets = torch.tensor(seq[-n_cont:], dtype=torch.long)
            logp = -F.cross_entropy(logits[r, end - n_cont:end], targets, reduction="none")
            out[i] = float(logp.double().sum())
    return out


def item_requests(item: dict[str, Any]) -> list[tuple[str, str]]:
    """The ``(context, continuation)`` text pairs of an item, one per choice.

    Normal items score ``" " + choice`` after ``context``; items with a ``"continuation"``
    key (WinoGrande partial scoring) score that continuation after ``context + choice``.
    """
    if "continuation" in item:
        return [(item["context"] + c, item["continuation"]) for c in item["choices"]]
    return [(item["context"], " " + c) for c in item["choices"]]


def _split_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """Move trailing whitespace of the context onto the continuation (as lm-eval does)."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids) if text else []


def _score_items(logits_fn: LogitsFn, tokenizer: Any, items: list[dict[str, Any]], *, batch_size: int,
                 max_len: int) -> dict[str, Any]:
    """acc, acc_norm and n of ``items``."""
    fallback = getattr(tokenizer, "bos_token_id", None)
    if fallback is None:
        fallback = getattr(tokenizer, "eos_token_id", None)
    requests, norms, spans = [], [], []
    cache: dict[str, list[int]] = {}
    for item in items:
        pairs = item_requests(item)
        spans.append((len(requests), len(pairs)))
        for choice, (ctx, cont) in zip(item["choices"], pairs):
            ctx, cont = _split_trailing_space(ctx, cont)
            if ctx not in cache:
                cache[ctx] = _encode(tokenizer, ctx)
            ctx_ids = cache[ctx]
            if not ctx_ids:
                if fallback is None:
                    raise ConfigError("an item has an empty context and the tokenizer has no BOS/EOS token")
                ctx_ids = [fallback]
            requests.append((ctx_ids, _encode(tokenizer, cont)))
            norms.append(float(max(len(cont if "continuation" in item else choice), 1)))
    lls = np.asarray(loglikelihoods(logits_fn, requests, batch_size=batch_size, max_len=max_len))
    norms_arr = np.asarray(norms)
    hits = hits_norm = 0
    for item, (start, k) in zip(items, spans):
        ll = lls[start:start + k]
        hits += int(np.argmax(ll) == item["label"])
        hits_norm += int(np.argmax(ll / norms_arr[start:start + k]) == item["label"])
    n = len(items)
    return {"acc": hits / n, "acc_norm": hits_norm / n, "n": n}


def zeroshot(logits_fn: LogitsFn, tokenizer: Any, tasks: Sequence[str] | str = ("arc_easy", "piqa"), *,
             limit: int | None = None, batch_size: int = 16, data_dir: str | os.PathLike | None = None,
             max_len: int = 1024) -> dict[str, dict[str, Any]]:
    """Zero-shot accuracy of ``logits_fn`` on multiple-choice tasks.

    Args:
        logits_fn: ``input_ids [B, S] int64 -> logits [B, S, V]``.
        tokenizer: the model's Hugging Face tokenizer.
        tasks: task names (``arc_easy``, ``hellaswag``, ``piqa``, ``winogrande``), or one
            comma-separated string.
        limit: items per task, a seeded sample (see :mod:`lrexport.eval.data`); None = all.
        batch_size: rows per ``logits_fn`` call.
        data_dir: folder of the evaluation files; None = :func:`~lrexport.eval.data.default_data_dir`.
        max_len: longest model input (see :func:`loglikelihoods`).

    Returns:
        ``{task: {"acc": float, "acc_norm": float, "n": int}}``.
    """
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else list(tasks)
    known = ", ".join(sorted(TASK_LOADERS))
    if not names:
        raise ConfigError(f"tasks is empty; expected one or more of: {known}")
    unknown = [t for t in names if t not in TASK_LOADERS]
    if unknown:
        raise ConfigError(f"unknown zero-shot task(s) {unknown}; known tasks: {known}")
    results: dict[str, dict[str, Any]] = {}
    for name in names:
        items = load_task(name, limit=limit, data_dir=data_dir)
        results[name] = _score_items(logits_fn, tokenizer, items, batch_size=batch_size, max_len=max_len)
        log.info("%s: acc %.4f acc_norm %.4f (n=%d)", name, results[name]["acc"], results[name]["acc_norm"],
                 results[name]["n"])
    return results
