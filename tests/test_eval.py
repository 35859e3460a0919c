"""Tests of lrexport.eval: perplexity, log-likelihoods, zero-shot scoring, ROUGE and data readers.

Everything runs offline on a tiny byte-level BPE tokenizer trained in-process on WikiText-2
validation lines, and tiny models (all-zero logits, a random 2-layer Llama, oracles).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lrexport.errors import ConfigError, DataError
from lrexport.eval import data as evdata
from lrexport.eval import (
    loglikelihoods,
    perplexity,
    rouge_l,
    xsum_pairs,
    xsum_prompt,
    xsum_rouge,
    zeroshot,
)
from lrexport.eval.zeroshot import item_requests

DATA = evdata.default_data_dir()


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = (DATA / "wikitext2" / "valid.tokens.txt").read_text(encoding="utf-8").splitlines()[:300]
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(lines, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


@pytest.fixture(scope="module")
def llama(tok):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(cfg).eval()

    def logits_fn(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    return logits_fn


@pytest.fixture(scope="module")
def text() -> str:
    return evdata.wikitext_test_text()[:20000]


# ---------------------------------------------------------------- perplexity


def test_ppl_zero_logits_equals_vocab_size(tok, text):
    vocab = len(tok)
    res = perplexity(lambda ids: torch.zeros(*ids.shape, vocab), tok, text, window=64, num_windows=5)
    assert res.ppl == pytest.approx(vocab, rel=1e-4)
    assert (res.windows, res.window, res.tokens) == (5, 64, 5 * 63)


def test_ppl_matches_float64_cross_entropy(tok, llama, text):
    window, n = 48, 5
    ids = torch.tensor(tok(text, add_special_tokens=False).input_ids[: n * window]).view(n, window)
    nll = [F.cross_entropy(llama(w[None])[0, :-1].double(), w[1:], reduction="none") for w in ids]
    ref = math.exp(float(torch.cat(nll).mean()))
    for bs in (1, 3):
        res = perplexity(llama, tok, text, window=window, num_windows=n, batch_size=bs)
        assert res.ppl == pytest.approx(ref, rel=1e-5), bs
    assert 50 < ref < 5000  # a random model is near-uniform over 512 tokens


def test_ppl_num_windows_none_uses_all_full_windows(tok, text):
    n_tok = len(tok(text, add_special_tokens=False).input_ids)
    res = perplexity(lambda ids: torch.zeros(*ids.shape, len(tok)), tok, text, window=256, num_windows=None)
    assert res.windows == n_tok // 256


def test_ppl_errors(tok, text):
    def zeros(ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, len(tok))

    with pytest.raises(ConfigError, match="window"):
        perplexity(zeros, tok, text, window=1)
    with pytest.raises(ConfigError, match="num_windows"):
        perplexity(zeros, tok, text, window=8, num_windows=0)
    with pytest.raises(DataError, match="shorter than one window"):
        perplexity(zeros, tok, "just a few words", window=64)


# ---------------------------------------------------------------- log-likelihoods


def test_loglikelihoods_batched_equals_unbatched_float64(tok, llama, text):
    ids = tok(text, add_special_tokens=False).input_ids
    requests = [(ids[s:s + c], ids[s + c:s + c + k]) for s, c, k in
                [(0, 5, 3), (100, 17, 1), (200, 2, 9), (300, 30, 4), (400, 11, 11), (500, 1, 2), (600, 40, 6)]]
    ref = []
    for ctx, cont in requests:
        seq = torch.tensor(ctx + cont)
        logp = torch.log_softmax(llama(seq[None, :-1])[0].double(), -1)
        ref.append(float(logp[len(ctx) - 1:, :].gather(1, seq[len(ctx):, None]).sum()))
    for bs in (1, 3, 16):
        got = loglikelihoods(llama, requests, batch_size=bs)
        assert got == pytest.approx(ref, rel=1e-5, abs=1e-4), bs
    # left truncation: only the last max_len + 1 tokens are kept
    ctx, cont = requests[3]
    seq = torch.tensor((ctx + cont)[-13:])
    logp = torch.log_softmax(llama(seq[None, :-1])[0].double(), -1)
    trunc = float(logp[-len(cont):].gather(1, seq[-len(cont):, None]).sum())
    assert loglikelihoods(llama, [requests[3]], max_len=12)[0] == pytest.approx(trunc, rel=1e-5, abs=1e-4)


def test_loglikelihoods_errors(llama):
    with pytest.raises(ConfigError, match="empty context"):
        loglikelihoods(llama, [([], [1, 2])])
    with pytest.raises(ConfigError, match="max_len"):
        loglikelihoods(llama, [([1], [2] * 10)], max_len=4)


# ---------------------------------------------------------------- zero-shot


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _boost_fn(vocab: int, good: set[int], bad: set[int]):
    """Logits that favour the ``good`` tokens and disfavour the ``bad`` ones at every position."""
    def fn(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, vocab)
        logits[..., sorted(good)] = 8.0
        logits[..., sorted(bad)] = -8.0
        return logits
    return fn


def test_zeroshot_piqa_oracle(tok, tmp_path):
    yes, no = set(tok(" yes").input_ids), set(tok(" no").input_ids)
    assert not yes & no, "test needs ' yes' and ' no' to share no token"
    labels = [0, 1, 1, 0, 1, 0, 0, 1]
    rows = [{"goal": f"Is item {i} good?", "sol1": "yes" if lab == 0 else "no", "sol2": "no" if lab == 0 else "yes",
             "label": lab} for i, lab in enumerate(labels)]
    _write_jsonl(tmp_path / evdata.PIQA, rows)
    oracle = _boost_fn(len(tok), yes, no)
    res = zeroshot(oracle, tok, ["piqa"], data_dir=tmp_path, batch_size=3)
    assert res == {"piqa": {"acc": 1.0, "acc_norm": 1.0, "n": 8}}
    anti = _boost_fn(len(tok), no, yes)
    assert zeroshot(anti, tok, "piqa", data_dir=tmp_path)["piqa"]["acc"] == 0.0
    # the answer is always "yes" for half the items when labels are ignored: flip half of them
    for r in rows[:4]:
        r["label"] = 1 - r["label"]
    _write_jsonl(tmp_path / evdata.PIQA, rows)
    assert zeroshot(oracle, tok, "piqa", data_dir=tmp_path)["piqa"]["acc"] == 0.5
    assert zeroshot(oracle, tok, "piqa", data_dir=tmp_path, limit=3)["piqa"]["n"] == 3


def test_zeroshot_winogrande_partial_scoring(tok, tmp_path):
    rows = [{"sentence": "The cup was on the _ of the table.", "option1": "edge", "option2": "middle", "answer": "1"},
            {"sentence": "He went to the _ to buy some bread.", "option1": "river", "option2": "market", "answer": "2"}]
    _write_jsonl(tmp_path / evdata.WINOGRANDE, rows)
    items = evdata.winogrande_items(data_dir=tmp_path)
    assert item_requests(items[0]) == [("The cup was on the edge", " of the table."),
                                       ("The cup was on the middle", " of the table.")]
    good_ctx = [tok(it["context"] + it["choices"][it["label"]]).input_ids for it in items]

    def oracle(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(*ids.shape, len(tok))
        for r, row in enumerate(ids.tolist()):
            if any(row[:len(c)] == c for c in good_ctx):  # the correct option fills the blank: predict the rest well
                logits[r, torch.arange(ids.shape[1] - 1), ids[r, 1:]] = 8.0
        return logits

    assert zeroshot(oracle, tok, ["winogrande"], data_dir=tmp_path)["winogrande"]["acc"] == 1.0


def test_arc_numeric_labels_and_hellaswag_sampling(tmp_path):
    _write_jsonl(tmp_path / evdata.ARC_EASY, [{"id": "x", "answerKey": "3", "question": {
        "stem": "Pick three.", "choices": [{"text": t, "label": str(i + 1)} for i, t in enumerate("abcd")]}}])
    item = evdata.arc_easy_items(data_dir=tmp_path)[0]
    assert item == {"context": "Question: Pick three.\nAnswer:", "choices": list("abcd"), "label": 2}
    sample = evdata.hellaswag_items(limit=30)
    idx = [it["context"] for it in sample]
    assert len(sample) == 30 and idx == [it["context"] for it in evdata.hellaswag_items(limit=30)]
    parts = [{json.loads(line)["ctx"] for line in (DATA / p).read_text().splitlines()} for p in evdata.HELLASWAG]
    assert all(any(c in part for c in idx) for part in parts), "sample should span all three part files"


@pytest.mark.parametrize("task", sorted(evdata.TASK_LOADERS))
def test_real_task_files(task):
    items = evdata.load_task(task, limit=5)
    assert len(items) == 5
    for it in items:
        assert isinstance(it["context"], str) and it["context"]
        assert isinstance(it["choices"], list) and len(it["choices"]) >= 2
        assert all(isinstance(c, str) and c for c in it["choices"])
        assert 0 <= it["label"] < len(it["choices"])
    head = evdata.TASK_LOADERS[task]()[:3]
    assert all(set(it) >= {"context", "choices", "label"} for it in head)


def test_zeroshot_unknown_task(tok):
    with pytest.raises(ConfigError, match="unknown zero-shot task.*boolq.*known tasks: arc_easy, hellaswag"):
        zeroshot(lambda ids: torch.zeros(*ids.shape, 8), tok, ["piqa", "boolq"])


# ---------------------------------------------------------------- ROUGE / XSum


def test_rouge_l_values():
    from rouge_score import rouge_scorer

    assert rouge_l(["the cat sat on the mat"], ["the cat sat on the mat"]) == 1.0
    assert rouge_l(["alpha beta gamma"], ["delta epsilon"]) == 0.0
    pred, ref = "Police arrested two men after a robbery in Cardiff", "Two men were arrested after a Cardiff robbery"
    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure
    assert rouge_l([pred, "x"], [ref, "x"]) == pytest.approx((direct + 1.0) / 2)
    assert 0.0 < direct < 1.0
    with pytest.raises(ConfigError, match="differ in length"):
        rouge_l(["a"], [])


def test_xsum_rouge_with_reference_generator(tok):
    pairs = xsum_pairs(n=3)
    table = {tuple(xsum_prompt(tok, p["article"])): tok(p["summary"]).input_ids + tok("\nTrailing junk.").input_ids
             for p in pairs}
    calls = []

    def generate(prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        calls.append(len(prompts))
        return [table[tuple(p)] for p in prompts]

    res = xsum_rouge(generate, tok, pairs=pairs, batch_size=2)
    assert res.rougeL == pytest.approx(1.0, abs=1e-6)
    assert calls == [2, 1] and res.n == 3 and res.references == [p["summary"] for p in pairs]
    assert res.prompt_format.startswith("plain")


def test_xsum_prompt_formats(tok):
    from transformers import PreTrainedTokenizerFast

    article = " ".join(["word"] * 2000)
    plain = xsum_prompt(tok, article, max_article_tokens=20)
    from lrexport.eval.rouge import PLAIN_PROMPT

    # the plain form carries exactly the special tokens the tokenizer itself adds (none for this one)
    frame = len(tok(PLAIN_PROMPT.format(article=""), add_special_tokens=True).input_ids)
    assert plain[: 2] == tok("Article:", add_special_tokens=True).input_ids[:2]
    assert frame + 15 < len(plain) <= frame + 22
    tail = "\n\nSummarize the above article in one sentence.\nSummary:"
    assert tok.decode(plain, skip_special_tokens=True).endswith(tail)
    chat_tok = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    chat_tok.chat_template = ("{% for m in messages %}<s>[{{ m.role }}] {{ m.content }}\n{% endfor %}"
                              "{% if add_generation_prompt %}[assistant] {% endif %}")
    text = chat_tok.decode(xsum_prompt(chat_tok, "Short article."), skip_special_tokens=False)
    assert text == ("<s>[user] Summarize the following article in one sentence.\n\nArticle: Short article.\n"
                    "[assistant] ")
    forced_plain = chat_tok.decode(xsum_prompt(chat_tok, "Short article.", chat=False), skip_special_tokens=False)
    assert forced_plain.startswith("Article: Short article.")
    with pytest.raises(ConfigError, match="no chat template"):
        xsum_prompt(tok, "Short article.", chat=True)


# ---------------------------------------------------------------- data readers and errors


def test_data_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("LREXPORT_DATA", str(tmp_path))
    assert evdata.default_data_dir() == tmp_path
    monkeypatch.setenv("LREXPORT_DATA", str(tmp_path / "missing"))
    with pytest.raises(DataError, match="LREXPORT_DATA"):
        evdata.default_data_dir()
    monkeypatch.delenv("LREXPORT_DATA")
    assert (evdata.default_data_dir() / "zeroshot").is_dir()


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        xsum_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="wiki.test.raw"):
        evdata.wikitext_test_text(data_dir=tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"goal": "g", "sol1": "a", "sol2": "b", "label": 0}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: malformed JSON"):
        evdata.piqa_items(bad)
    bad.write_text('{"goal": "g", "sol1": "a", "label": 0}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:1: missing field 'sol2'"):
        evdata.piqa_items(bad)
    with pytest.raises(ConfigError, match="limit"):
        evdata.piqa_items(limit=0)


def test_text_readers():
    assert evdata.wikitext_test_text().startswith(" \n = Robert Boulter = \n")
    assert evdata.calibration_text().startswith(" \n = Homarus gammarus = \n")
    pairs = xsum_pairs(n=2)
    assert len(pairs) == 2 and set(pairs[0]) == {"article", "summary"} and pairs[0]["summary"]
