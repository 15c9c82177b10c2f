"""Generation metrics of a causal LM (ROUGE-L, BLEU, chrF) as sums that pool exactly across sites.

A site generates a completion for some of its held-out prompts and scores each
against the row's reference completion. What leaves the site is numbers only,
each a sum over the site's completions, so the coordinator adds sites and gets
the figures of all completions scored at once:

- ROUGE-L (rouge-score's `RougeScorer(["rougeL"])`): the sum of per-completion
  F-measures and their number -> the mean F-measure, in [0, 1];
- BLEU and chrF (sacrebleu's defaults): corpus-level scores, from the metric's
  sufficient statistics (n-gram matches and totals, lengths), summed over
  completions; the corpus score of the summed statistics is the score of the
  pooled corpus, in [0, 100].

sacrebleu has no public per-sentence statistics; `_extract_corpus_statistics`
and `_compute_score_from_stats` are what its own `corpus_score` and its
significance tests (paired bootstrap and approximate randomization) use, and
tests/test_generation_metrics.py checks the pooled score against
`sacrebleu.corpus_bleu` / `corpus_chrf`.
"""

from __future__ import annotations

from typing import Any

import torch
from sacrebleu.metrics import BLEU, CHRF
from transformers import GenerationConfig

GENERATED = "generated"      # completions scored
ROUGE_L_SUM = "rougeL_sum"   # sum of their ROUGE-L F-measures
BLEU_STATS = "bleu_stats"    # BLEU sufficient statistics: hyp length, ref length, matches and totals per n-gram order
CHRF_STATS = "chrf_stats"    # chrF sufficient statistics: per character n-gram order, hyp, ref and matching counts


def _summed(stats: list[list[Any]]) -> list[int]:
    return [int(sum(column)) for column in zip(*stats)]


def score_counts(hypotheses: list[str], references: list[str]) -> dict[str, Any]:
    """Sums over (generated, reference) pairs that `generation_metrics` turns into figures; sums of
    two sets' counts give the figures of the two sets together."""
    if not hypotheses:
        return {}
    # rouge-score imports nltk (and scipy), a second at start-up that only a generating run needs
    from rouge_score.rouge_scorer import RougeScorer

    rouge = RougeScorer(["rougeL"])
    return {
        GENERATED: len(hypotheses),
        ROUGE_L_SUM: float(sum(rouge.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in zip(hypotheses, references))),
        BLEU_STATS: _summed(BLEU()._extract_corpus_statistics(hypotheses, [references])),
        CHRF_STATS: _summed(CHRF()._extract_corpus_statistics(hypotheses, [references])),
    }


def generation_metrics(counts: dict[str, Any]) -> dict[str, float]:
    """`eval_rougeL` (mean F-measure), `eval_bleu` and `eval_chrf` (corpus scores) from pooled counts;
    none when nothing was generated."""
    n = counts.get(GENERATED, 0)
    if not n or not isinstance(counts.get(BLEU_STATS), list) or not isinstance(counts.get(CHRF_STATS), list):
        return {}
    return {
        "eval_rougeL": counts[ROUGE_L_SUM] / n,
        "eval_bleu": float(BLEU()._compute_score_from_stats(counts[BLEU_STATS]).score),
        "eval_chrf": float(CHRF()._compute_score_from_stats(counts[CHRF_STATS]).score),
    }


def greedy_completions(model, prompts: list[list[int]], tokenizer, max_new_tokens: int,
                       batch_size: int = 16) -> list[list[int]]:
    """The token ids the model generates greedily after each prompt (at most `max_new_tokens`, up to
    its end-of-sequence token, which is not included). Prompts are left-padded in batches."""
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else eos  # for an empty prompt
    greedy = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              pad_token_id=pad, eos_token_id=eos)
    device = next(model.parameters()).device
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        chunk = [p or [start] for p in prompts[i:i + batch_size]]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in chunk], dtype=torch.long, device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], dtype=torch.long, device=device)
        generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)[:, width:]
        for row in generated.tolist():
            out.append(row[:row.index(eos)] if eos in row else row)
    return out
