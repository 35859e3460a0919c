"""Evaluation: perplexity, XSum ROUGE-L and zero-shot multiple-choice accuracy.

The model side is passed in as plain callables:

- :data:`LogitsFn`: ``input_ids`` int64 ``[B, S]`` -> float32 logits ``[B, S, V]`` of a
  causal model (rows may be right-padded);
- :data:`GenerateFn`: ``(prompts as token id lists, max_new_tokens)`` -> the greedily
  generated ids of each prompt (prompt excluded, stopped at the model's stop tokens).

Data files are read by :mod:`lrexport.eval.data` (see ``shared/data/README.md``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lrexport.eval.data import (
    calibration_text,
    default_data_dir,
    load_task,
    wikitext_test_text,
    xsum_pairs,
)
from lrexport.eval.ppl import PplResult, perplexity
from lrexport.eval.rouge import RougeResult, rouge_l, xsum_prompt, xsum_rouge
from lrexport.eval.zeroshot import loglikelihoods, zeroshot

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
GenerateFn = Callable[[list[list[int]], int], list[list[int]]]

__all__ = [
    "GenerateFn",
    "LogitsFn",
    "PplResult",
    "RougeResult",
    "calibration_text",
    "default_data_dir",
    "load_task",
    "loglikelihoods",
    "perplexity",
    "rouge_l",
    "wikitext_test_text",
    "xsum_pairs",
    "xsum_prompt",
    "xsum_rouge",
    "zeroshot",
]
