"""XSum summarization scored with ROUGE-L (F1, ``rouge_score`` with the Porter stemmer).

Prompt formats (the article is first truncated to ``max_article_tokens`` tokens):

- tokenizer with a chat template: one user message :data:`CHAT_PROMPT`, rendered with
  ``add_generation_prompt=True`` and encoded without adding special tokens (the template
  carries its own BOS);
- otherwise the plain text :data:`PLAIN_PROMPT`, preceded by the tokenizer's BOS token
  when it has one.

Each generation is decoded with ``skip_special_tokens=True``, stripped, and cut to its
first non-empty line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lrexport.errors import ConfigError
from lrexport.eval.data import xsum_pairs
from lrexport.util import progress

if TYPE_CHECKING:
    from lrexport.eval import GenerateFn

log = logging.getLogger(__name__)

CHAT_PROMPT = "Summarize the following article in one sentence.\n\nArticle: {article}"
PLAIN_PROMPT = "Article: {article}\n\nSummarize the above article in one sentence.\nSummary:"


@dataclass
class RougeResult:
    """ROUGE-L of generated summaries against the references."""

    rougeL: float  # the metric's usual name
    n: int
    predictions: list[str] = field(repr=False)
    references: list[str] = field(repr=False)
    prompt_format: str


def rouge_l(predictions: list[str], references: list[str]) -> float:
    """Mean ROUGE-L F1 in [0, 1] of ``predictions`` against ``references`` (stemmed)."""
    from rouge_score import rouge_scorer

    if len(predictions) != len(references):
        raise ConfigError(f"predictions and references differ in length ({len(predictions)} vs {len(references)})")
    if not predictions:
        raise ConfigError("rouge_l needs at least one prediction/reference pair, got none")
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    total = sum(scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references))
    return total / len(predictions)


def has_chat_template(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def _use_chat(tokenizer: Any, chat: bool | None) -> bool:
    if chat and not has_chat_template(tokenizer):
        raise ConfigError("chat=True, but the tokenizer has no chat template")
    return has_chat_template(tokenizer) if chat is None else chat


def prompt_format(tokenizer: Any, chat: bool | None = None) -> str:
    """A one-line description of the prompt format :func:`xsum_prompt` uses with ``tokenizer``."""
    if _use_chat(tokenizer, chat):
        return f"chat template, user message {CHAT_PROMPT!r}, add_generation_prompt=True"
    return f"plain {PLAIN_PROMPT!r}"


def xsum_prompt(tokenizer: Any, article: str, *, max_article_tokens: int = 512, chat: bool | None = None) -> list[int]:
    """Token ids of the summarization prompt for ``article``.

    The article is truncated to its first ``max_article_tokens`` tokens. With a chat
    template: one user message ``"Summarize the following article in one sentence.\\n\\n
    Article: {article}"`` and ``add_generation_prompt=True``. Without: ``"Article:
    {article}\\n\\nSummarize the above article in one sentence.\\nSummary:"`` with the
    tokenizer's own special tokens (BOS where the tokenizer adds one).
    ``chat`` forces one form (None: the chat template when the tokenizer has one).
    """
    if isinstance(max_article_tokens, bool) or not isinstance(max_article_tokens, int) or max_article_tokens < 1:
        raise ConfigError(f"max_article_tokens must be a positive integer, got {max_article_tokens!r}")
    ids = tokenizer(article, add_special_tokens=False).input_ids
    if len(ids) > max_article_tokens:
        article = tokenizer.decode(ids[:max_article_tokens], skip_special_tokens=True)
    if _use_chat(tokenizer, chat):
        messages = [{"role": "user", "content": CHAT_PROMPT.format(article=article)}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return list(tokenizer(text, add_special_tokens=False).input_ids)
    # the tokenizer adds BOS only where its model expects one (not, e.g., a chat-start token)
    return list(tokenizer(PLAIN_PROMPT.format(article=article), add_special_tokens=True).input_ids)


def clean_generation(tokenizer: Any, ids: list[int]) -> str:
    """Decode ``ids`` (special tokens skipped) and keep the first non-empty stripped line."""
    text = tokenizer.decode(list(ids), skip_special_tokens=True).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def xsum_rouge(generate_fn: GenerateFn, tokenizer: Any, *,
               pairs: list[dict[str, str]] | None = None, n: int | None = 200, max_new_tokens: int = 48,
               batch_size: int = 8, max_article_tokens: int = 512, chat: bool | None = None) -> RougeResult:
    """Generate one-sentence summaries of XSum articles and score them with ROUGE-L.

    Args:
        generate_fn: ``(prompts, max_new_tokens) -> generated ids per prompt`` (greedy).
        tokenizer: the model's Hugging Face tokenizer.
        pairs: ``{"article", "summary"}`` dicts; None reads the shared XSum test file.
        n: how many pairs to use (the first ``n``; None = all).
        max_new_tokens: generation budget per summary.
        batch_size: prompts per ``generate_fn`` call.
        max_article_tokens: articles are truncated to this many tokens.
        chat: use the chat template (None: when the tokenizer has one).
    """
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if pairs is None:
        pairs = xsum_pairs(n=n)
    elif n is not None:
        pairs = pairs[:n]
    if not pairs:
        raise ConfigError("xsum_rouge needs at least one (article, summary) pair")
    prompts = [xsum_prompt(tokenizer, p["article"], max_article_tokens=max_article_tokens, chat=chat) for p in pairs]
    predictions: list[str] = []
    chunks = range(0, len(prompts), batch_size)
    for start in progress(chunks, desc="xsum", total=len(chunks)):
        chunk = prompts[start:start + batch_size]
        outs = generate_fn(chunk, max_new_tokens)
        if len(outs) != len(chunk):
            raise ConfigError(f"generate_fn returned {len(outs)} outputs for {len(chunk)} prompts")
        predictions.extend(clean_generation(tokenizer, out) for out in outs)
    references = [p["summary"] for p in pairs]
    score = rouge_l(predictions, references)
    log.info("XSum ROUGE-L %.4f over %d articles", score, len(pairs))
    return RougeResult(rougeL=score, n=len(pairs), predictions=predictions, references=references,
                       prompt_format=prompt_format(tokenizer, chat))
