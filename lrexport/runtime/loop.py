"""The one generation loop. It owns the caches, the sampling and the progressive schedule,
and drives any backend (the PyTorch graph or an ONNX Runtime session) through ``step``.

A batch of prompts of different lengths is right-padded for the prefill; every row then
decodes at its own position (``past_len``), so padding never reaches a real token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lrexport.errors import CacheOverflowError, ConfigError
from lrexport.runtime.sampling import Sampling, sample
from lrexport.schedule import Schedule, active_params

log = logging.getLogger(__name__)


class Backend(Protocol):
    """What the loop needs from a backend."""

    max_len: int
    rank_max: list[int]  # stored rank of each run-time-rank linear (empty: no rank input)
    rank_cost: list[int]  # parameters per unit of rank of each of them (m + n)
    dense_params: int  # projection parameters that stay dense
    total_params: int  # projection parameters of the uncompressed model

    def new_caches(self, batch: int, capacity: int) -> Any: ...

    def step(self, input_ids: torch.Tensor, past_len: torch.Tensor, caches: Any,
             ranks: list[int] | None) -> tuple[torch.Tensor, Any]:
        """(logits ``[B, S, V]`` on the host or on the backend's GPU, caches); ``input_ids`` and
        ``past_len`` on the host."""
        ...

    # optional: ``device_loop(caches) -> DeviceLoop | None`` (lrexport.runtime.ort_backend): decode steps
    # driven on the GPU, which greedy decoding uses (greedy_on_device)


def greedy_on_device(dl: Any, first: torch.Tensor, past_len: torch.Tensor, n: int,
                     suppress: torch.Tensor | None = None, suppress_until: int = 0) -> Iterator[torch.Tensor]:
    """Greedy decode steps kept on the GPU and launched one step ahead of the host.

    ``dl`` is a backend's :class:`~lrexport.runtime.ort_backend.DeviceLoop`; ``first`` the ``[B]``
    token ids that start decoding (token 1, picked from the prefill), ``past_len`` their ``[B]``
    positions. Yields the ``[B]`` ids of tokens 2 .. ``n`` (host tensors), one per decode step. Each
    step's argmax is written on the GPU into the next step's token ids and the lengths advance there,
    so the host never feeds a step: when token ``k`` is yielded, the step that picks token ``k + 1`` is
    already launched, and the GPU runs back to back while the host reads ids. Closing the generator
    early (a stop token in every row) leaves at most that one step's work, which is waited for.
    ``suppress``: ids that cannot be picked for tokens up to ``suppress_until`` (``min_new_tokens``).
    """
    if n < 2:
        return
    B = first.shape[0]
    slots = [torch.empty(B, dtype=torch.int64).pin_memory() for _ in range(2)]
    events = [torch.cuda.Event(), torch.cuda.Event()]
    dev = dl.ids.device
    ban = suppress.to(dev) if suppress is not None and len(suppress) else None

    def launch(k: int) -> None:  # the step that picks token k (k >= 2) from token k - 1
        last = dl.replay()[:, -1]
        if ban is not None and k <= suppress_until:
            last = last.index_fill(-1, ban, float("-inf"))
        nxt = last.argmax(-1)
        dl.ids.view(B).copy_(nxt)
        dl.past_len.add_(1)
        slots[k % 2].copy_(nxt, non_blocking=True)
        events[k % 2].record(dl.stream)

    try:
        with torch.cuda.stream(dl.stream):
            dl.ids.view(B).copy_(first.reshape(B).to(torch.int64), non_blocking=False)
            dl.past_len.copy_(past_len.reshape(B).to(torch.int64), non_blocking=False)
            launch(2)
            for k in range(2, n + 1):
                if k < n:
                    launch(k + 1)  # ahead: the GPU has the next step before the host reads token k
                events[k % 2].synchronize()
                yield slots[k % 2].clone()
    finally:
        dl.stream.synchronize()


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (stop token included if hit)
    finish_reasons: list[str]  # "stop" or "length"
    active_fractions: list[float] = field(default_factory=list)  # per decode step, of the dense projections
    live_rows: list[int] = field(default_factory=list)  # rows still generating at each decode step
    prefill_fraction: float = 1.0

    @property
    def active_sum(self) -> tuple[float, int]:
        """(sum of activated fractions over every row's decode steps, number of such steps)."""
        return sum(f * n for f, n in zip(self.active_fractions, self.live_rows)), sum(self.live_rows)

    @property
    def avg_active_params(self) -> float:
        """Activated projection parameters, as a fraction of the uncompressed projections, averaged
        over the decode steps of every row (the prefill fraction when nothing was decoded)."""
        total, n = self.active_sum
        return total / n if n else self.prefill_fraction


def _fraction(backend: Backend, ranks: list[int] | None) -> float:
    if not backend.total_params:
        return 1.0
    r = ranks if ranks is not None else backend.rank_max
    return active_params(r, backend.rank_cost, backend.dense_params) / backend.total_params


def generate(
    backend: Backend,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    stop_ids: Sequence[int] = (),
    schedule: Schedule | None = None,
    pad_id: int = 0,
    min_new_tokens: int = 0,
    on_token: Callable[[int, list[int | None]], None] | None = None,
) -> GenerationResult:
    """Generate up to ``max_new_tokens`` for each prompt; ``on_token(step, ids)`` streams them
    (``None`` for rows that already stopped). Stop tokens cannot be sampled before
    ``min_new_tokens`` tokens were generated."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    lens = [len(p) for p in prompts]
    need = max(lens) + max_new_tokens
    if need > backend.max_len:
        raise CacheOverflowError(
            f"a prompt of {max(lens)} tokens plus max_new_tokens={max_new_tokens} needs {need} positions, "
            f"more than the model's maximum length {backend.max_len}")
    B = len(prompts)
    caches = backend.new_caches(B, need)
    use_ranks = bool(backend.rank_max) and schedule is not None
    gen = torch.Generator().manual_seed(sampling.seed)
    stops = set(int(s) for s in stop_ids)

    ids = torch.full((B, max(lens)), pad_id, dtype=torch.int64)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.as_tensor(list(p), dtype=torch.int64)
    pos = torch.tensor(lens, dtype=torch.int64)
    ranks = schedule.ranks(0, backend.rank_max) if use_ranks else None
    logits, caches = backend.step(ids, torch.zeros(B, dtype=torch.int64), caches, ranks)
    last = logits[torch.arange(B), pos - 1]
    result = GenerationResult(tokens=[[] for _ in range(B)], finish_reasons=["length"] * B,
                              prefill_fraction=_fraction(backend, ranks))
    done = [False] * B
    suppress = torch.tensor(sorted(stops), dtype=torch.int64)
    device_loop = getattr(backend, "device_loop", None)
    if sampling.greedy and not use_ranks and device_loop is not None and max_new_tokens > 1:
        dl = device_loop(caches)
        if dl is not None:
            _greedy_pipelined(dl, last, pos, max_new_tokens, suppress, min_new_tokens, stops, on_token, result,
                              _fraction(backend, None))
            return result
    for step in range(1, max_new_tokens + 1):
        if step <= min_new_tokens and len(suppress):
            last = last.index_fill(-1, suppress.to(last.device), float("-inf"))
        if not sampling.greedy:  # the seeded generator is on the host; greedy picks on the logits' device
            last = last.cpu()
        nxt = sample(last, sampling, gen).cpu()
        _emit(step, nxt, done, stops, result, on_token)
        if all(done) or step == max_new_tokens:
            break
        ranks = schedule.ranks(step, backend.rank_max) if use_ranks else None
        result.active_fractions.append(_fraction(backend, ranks))
        result.live_rows.append(B - sum(done))
        logits, caches = backend.step(nxt[:, None], pos, caches, ranks)
        pos = pos + 1
        last = logits[:, -1]
    return result


def _emit(step: int, nxt: torch.Tensor, done: list[bool], stops: set[int], result: GenerationResult,
          on_token: Callable[[int, list[int | None]], None] | None) -> None:
    emitted: list[int | None] = []
    for b in range(len(done)):
        if done[b]:
            emitted.append(None)
            continue
        t = int(nxt[b])
        result.tokens[b].append(t)
        emitted.append(t)
        if t in stops:
            done[b], result.finish_reasons[b] = True, "stop"
    if on_token is not None:
        on_token(step, emitted)


def _greedy_pipelined(dl: Any, last: torch.Tensor, pos: torch.Tensor, max_new_tokens: int, suppress: torch.Tensor,
                      min_new_tokens: int, stops: set[int], on_token, result: GenerationResult,
                      fraction: float) -> None:
    """generate()'s greedy decoding on a backend's device loop (:func:`greedy_on_device`): the same
    tokens as the step-by-step loop, with the GPU one step ahead of the host."""
    B = last.shape[0]
    done = [False] * B
    if min_new_tokens >= 1 and len(suppress):
        last = last.index_fill(-1, suppress.to(last.device), float("-inf"))
    first = last.argmax(-1)
    nxt = first.cpu()  # synchronous: ``first`` is there before the device loop's stream reads it
    _emit(1, nxt, done, stops, result, on_token)
    if all(done):
        return
    steps = greedy_on_device(dl, first, pos, max_new_tokens, suppress, min_new_tokens)
    try:
        for step, nxt in enumerate(steps, start=2):
            result.active_fractions.append(fraction)
            result.live_rows.append(B - sum(done))
            _emit(step, nxt, done, stops, result, on_token)
            if all(done):
                break
    finally:
        steps.close()
