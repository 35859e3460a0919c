"""Readers for the offline evaluation files (``shared/data``, see its README.md).

Every reader takes an optional explicit ``path`` so that users can pass their own copy
of a file; without it the file is looked up under :func:`default_data_dir` (or under an
explicit ``data_dir``). Missing or malformed files raise :class:`~lrexport.errors.DataError`.

Zero-shot loaders return items of one uniform form::

    {"context": str, "choices": list[str], "label": int}

and each choice ``c`` is scored as the continuation ``" " + c`` of ``context``
(lm-evaluation-harness formulations). WinoGrande items add a ``"continuation"`` key
(partial scoring): there choice ``c`` is substituted into the blank, so the scored text is
``continuation`` under the context ``context + c``.

``limit`` in every zero-shot loader takes a seeded uniform sample (:data:`SAMPLE_SEED`) of
``limit`` items, kept in file order, rather than a prefix: the HellaSwag files are ordered
by source, so a prefix would not be representative, and the other tasks use the same rule
for consistency. ``xsum_pairs(n=...)`` takes the first ``n`` pairs.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lrexport.errors import ConfigError, DataError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike
SAMPLE_SEED = 1234

WIKITEXT_TEST, CALIBRATION = "wikitext2/wiki.test.raw", "wikitext2/valid.tokens.txt"
XSUM = "summarization/xsum_test.jsonl"
PIQA = "zeroshot/piqa_valid.jsonl"
ARC_EASY = "zeroshot/arc_easy_test.jsonl"
WINOGRANDE = "zeroshot/winogrande_dev.jsonl"
HELLASWAG = tuple(f"zeroshot/hellaswag_val_part{i}.jsonl" for i in (1, 2, 3))


def default_data_dir() -> Path:
    """The folder holding the evaluation files.

    Resolution order: ``$LREXPORT_DATA`` if set; else ``<repo>/../shared/data`` where
    ``<repo>`` is the folder containing the ``lrexport`` package; else ``./shared/data``
    or ``../shared/data`` relative to the current directory.
    """
    env = os.environ.get("LREXPORT_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise DataError(f"LREXPORT_DATA={env!r} is not a folder; expected the evaluation data folder "
                            "(the one holding wikitext2/, summarization/ and zeroshot/)")
        return path
    repo = Path(__file__).resolve().parents[2]
    candidates = [repo.parent / "shared" / "data", Path.cwd() / "shared" / "data",
                  Path.cwd().parent / "shared" / "data"]
    for cand in candidates:
        if cand.is_dir():
            return cand.resolve()
    tried = ", ".join(str(c) for c in candidates)
    raise DataError(f"evaluation data folder not found (tried {tried}); pass --data DIR or set LREXPORT_DATA "
                    "to the folder holding wikitext2/, summarization/ and zeroshot/")


def _resolve(path: PathLike | None, rel: str, data_dir: PathLike | None, what: str) -> Path:
    """The explicit ``path`` or ``<data_dir>/<rel>``; DataError if it is not a file."""
    if path is None:
        base = Path(data_dir) if data_dir is not None else default_data_dir()
        path = base / rel
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{what} file not found: {path}")
    return path


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_bytes().decode("utf-8")  # no newline translation: the file as is
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {what} file {path}: {e}; expected UTF-8 text") from e


def _read_jsonl(path: Path, what: str) -> list[dict[str, Any]]:
    """Parse a JSON-lines file into dicts, skipping blank lines."""
    rows = []
    for lineno, line in enumerate(_read_text(path, what).split("\n"), 1):  # not splitlines(): U+2028 in strings
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: malformed JSON in {what} file ({e.msg}); "
                            "expected one JSON object per line") from e
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object in {what} file, got {type(row).__name__}")
        row["_where"] = f"{path}:{lineno}"
        rows.append(row)
    if not rows:
        raise DataError(f"{what} file {path} holds no records")
    return rows


def _field(row: dict[str, Any], key: str, kind: type | tuple[type, ...] = str) -> Any:
    """``row[key]``, checked for presence and type; DataError naming file and line otherwise."""
    if key not in row:
        raise DataError(f"{row['_where']}: missing field {key!r}")
    value = row[key]
    if not isinstance(value, kind):
        want = "/".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise DataError(f"{row['_where']}: field {key!r} has type {type(value).__name__}, expected {want}")
    return value


def _label(row: dict[str, Any], value: Any, n: int) -> int:
    label = int(value) if isinstance(value, int) or str(value).isdigit() else -1
    if not 0 <= label < n:
        raise DataError(f"{row['_where']}: label {value!r} is not an index into {n} choices")
    return label


def sample_items(items: list[Any], limit: int | None, seed: int = SAMPLE_SEED) -> list[Any]:
    """A seeded uniform sample of ``limit`` items in their original order (all if None)."""
    if limit is None:
        return items
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive integer or None, got {limit!r}")
    if limit >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def wikitext_test_text(path: PathLike | None = None, *, data_dir: PathLike | None = None) -> str:
    """The WikiText-2 raw test split, the file ``wiki.test.raw`` read as is.

    This is the llama.cpp ``llama-perplexity -f wiki.test.raw`` form (blank rows kept as
    ``" \\n"`` lines), not the ``"\\n\\n".join(rows)`` form of GPTQ-style scripts.
    """
    return _read_text(_resolve(path, WIKITEXT_TEST, data_dir, "WikiText-2 test (wiki.test.raw)"), "WikiText-2 test")


def calibration_text(path: PathLike | None = None, *, data_dir: PathLike | None = None) -> str:
    """The WikiText-2 (tokenized) validation split ``valid.tokens.txt``, read as is."""
    p = _resolve(path, CALIBRATION, data_dir, "calibration text (valid.tokens.txt)")
    return _read_text(p, "calibration text")


def xsum_pairs(path: PathLike | None = None, n: int | None = None, *,
               data_dir: PathLike | None = None) -> list[dict[str, str]]:
    """The first ``n`` (all if None) XSum test pairs as ``{"article", "summary"}`` dicts."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"n must be a positive integer or None, got {n!r}")
    what = "XSum (JSON lines with article, summary)"
    rows = _read_jsonl(_resolve(path, XSUM, data_dir, what), what)
    rows = rows if n is None else rows[:n]
    return [{"article": _field(r, "article"), "summary": _field(r, "summary")} for r in rows]


def piqa_items(path: PathLike | None = None, *, limit: int | None = None,
               data_dir: PathLike | None = None) -> list[dict[str, Any]]:
    """PIQA validation: context ``"Question: {goal}\\nAnswer:"``, choices ``[sol1, sol2]``."""
    what = "PIQA (JSON lines with goal, sol1, sol2, label)"
    items = []
    for r in _read_jsonl(_resolve(path, PIQA, data_dir, what), what):
        choices = [_field(r, "sol1"), _field(r, "sol2")]
        items.append({"context": f"Question: {_field(r, 'goal')}\nAnswer:", "choices": choices,
                      "label": _label(r, _field(r, "label", (int, str)), 2)})
    return sample_items(items, limit)


def arc_easy_items(path: PathLike | None = None, *, limit: int | None = None,
                   data_dir: PathLike | None = None) -> list[dict[str, Any]]:
    """ARC-Easy test: context ``"Question: {stem}\\nAnswer:"``, choices the choice texts.

    ``answerKey`` (a letter or a digit) is mapped to the index of the choice with that label.
    """
    what = "ARC-Easy (JSON lines with question.stem, question.choices, answerKey)"
    items = []
    for r in _read_jsonl(_resolve(path, ARC_EASY, data_dir, what), what):
        q = _field(r, "question", dict)
        q["_where"] = r["_where"]
        choices = _field(q, "choices", list)
        if not choices or not all(isinstance(c, dict) and "text" in c and "label" in c for c in choices):
            raise DataError(f"{r['_where']}: question.choices must be a list of {{text, label}} objects")
        labels = [str(c["label"]) for c in choices]
        key = str(_field(r, "answerKey", (str, int)))
        if key not in labels:
            raise DataError(f"{r['_where']}: answerKey {key!r} is not one of the choice labels {labels}")
        items.append({"context": f"Question: {_field(q, 'stem')}\nAnswer:",
                      "choices": [str(c["text"]) for c in choices], "label": labels.index(key)})
    return sample_items(items, limit)


def winogrande_items(path: PathLike | None = None, *, limit: int | None = None,
                     data_dir: PathLike | None = None) -> list[dict[str, Any]]:
    """WinoGrande dev with lm-eval partial scoring.

    ``context`` is the sentence up to the ``_``, ``choices`` are ``[option1, option2]`` and
    ``continuation`` is ``" " + `` the stripped rest of the sentence after the ``_``; the
    same continuation is scored under each ``context + option``.
    """
    what = "WinoGrande (JSON lines with sentence, option1, option2, answer)"
    items = []
    for r in _read_jsonl(_resolve(path, WINOGRANDE, data_dir, what), what):
        sentence = _field(r, "sentence")
        idx = sentence.find("_")
        if idx < 0:
            raise DataError(f"{r['_where']}: sentence has no '_' blank: {sentence!r}")
        answer = str(_field(r, "answer", (str, int)))
        if answer not in ("1", "2"):
            raise DataError(f"{r['_where']}: answer {answer!r} must be '1' or '2'")
        items.append({"context": sentence[:idx], "choices": [_field(r, "option1"), _field(r, "option2")],
                      "continuation": " " + sentence[idx + 1:].strip(), "label": int(answer) - 1})
    return sample_items(items, limit)


def hellaswag_items(path: PathLike | Sequence[PathLike] | None = None, *, limit: int | None = None,
                    data_dir: PathLike | None = None) -> list[dict[str, Any]]:
    """HellaSwag validation (all part files, in order): context ``ctx``, choices ``endings``.

    ``path`` may be one file or a list of part files; by default the three shared parts.
    With ``limit``, a seeded sample across all parts is taken (the files are ordered by
    source, so a prefix would be ActivityNet only).
    """
    what = "HellaSwag (JSON lines with ctx, endings, label)"
    given = None if path is None else [path] if isinstance(path, (str, os.PathLike)) else list(path)
    paths = ([_resolve(None, rel, data_dir, what) for rel in HELLASWAG] if given is None
             else [_resolve(p, "", None, what) for p in given])
    items = []
    for p in paths:
        for r in _read_jsonl(p, what):
            endings = _field(r, "endings", list)
            if not endings or not all(isinstance(e, str) for e in endings):
                raise DataError(f"{r['_where']}: endings must be a non-empty list of strings")
            items.append({"context": _field(r, "ctx"), "choices": endings,
                          "label": _label(r, _field(r, "label", (int, str)), len(endings))})
    return sample_items(items, limit)


TASK_LOADERS: dict[str, Callable[..., list[dict[str, Any]]]] = {
    "arc_easy": arc_easy_items, "hellaswag": hellaswag_items, "piqa": piqa_items, "winogrande": winogrande_items}


def load_task(name: str, *, limit: int | None = None, data_dir: PathLike | None = None,
              path: PathLike | None = None) -> list[dict[str, Any]]:
    """Items of the zero-shot task ``name`` (one of :data:`TASK_LOADERS`)."""
    if name not in TASK_LOADERS:
        raise ConfigError(f"unknown zero-shot task {name!r}; known tasks: {', '.join(sorted(TASK_LOADERS))}")
    items = TASK_LOADERS[name](path, limit=limit, data_dir=data_dir)
    log.debug("loaded %d %s items", len(items), name)
    return items
