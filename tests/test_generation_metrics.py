"""Generation metrics of a causal LM: ROUGE-L, BLEU and chrF pooled from the sites' sums equal the scores
of all completions at once (rouge-score and sacrebleu, called directly), and a federated run reports them."""

import itertools
import json
import random

import pytest
import sacrebleu
import torch
from peft import set_peft_model_state_dict
from rouge_score.rouge_scorer import RougeScorer
from safetensors.torch import load_file

from fedlora import config as cfg
from fedlora.data.sites import simulated_site_data
from fedlora.models import load_model, load_tokenizer
from fedlora.simulations.inprocess import run_inprocess
from fedlora.tasks import CausalLMTask, build_task
from fedlora.tasks.base import Task
from fedlora.tasks.generation import (
    generation_metrics,
    greedy_completions,
    score_counts,
)
from fedlora.training import evaluate_counts

WORDS = ("patient", "reports", "chest", "pain", "since", "morning", "refer", "to", "cardiology", "today", "no",
         "fever", "the", "ecg", "shows", "st", "elevation", "admit", "for", "observation", "and", "repeat", "troponin")


def _pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Reference sentences and hypotheses that share some of their words, in varied order and length."""
    rng = random.Random(seed)
    hyps, refs = [], []
    for _ in range(n):
        ref = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
        hyp = [w if rng.random() < 0.6 else rng.choice(WORDS) for w in ref]
        hyp = hyp[:rng.randint(1, len(hyp))] + [rng.choice(WORDS) for _ in range(rng.randint(0, 3))]
        refs.append(" ".join(ref) + rng.choice(("", ".", " today.")))
        hyps.append(" ".join(hyp))
    return hyps, refs


def test_sites_sums_pool_to_the_scores_of_all_completions_at_once():
    hyps, refs = _pairs(40, seed=3)
    cuts = [0, 7, 8, 25, 40]  # four sites of unequal size, one with a single completion
    pooled: dict = {}
    for lo, hi in itertools.pairwise(cuts):
        Task.add_counts(pooled, score_counts(hyps[lo:hi], refs[lo:hi]))
    figures = generation_metrics(pooled)
    rouge = RougeScorer(["rougeL"])
    mean_rouge = sum(rouge.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps)
    assert figures["eval_rougeL"] == pytest.approx(mean_rouge, rel=1e-12)
    assert figures["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, rel=1e-12)
    assert figures["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, rel=1e-12)
    assert 0 < figures["eval_bleu"] < 100 and 0 < figures["eval_chrf"] < 100 and 0 < figures["eval_rougeL"] < 1
    # corpus-level, not a mean of the sites' own scores
    per_site = [generation_metrics(score_counts(hyps[lo:hi], refs[lo:hi]))["eval_bleu"]
                for lo, hi in itertools.pairwise(cuts)]
    assert figures["eval_bleu"] != pytest.approx(sum(per_site) / len(per_site), rel=1e-6)
    # only numbers travel: integer statistics and one float sum
    assert all(isinstance(v, int) for v in pooled["bleu_stats"] + pooled["chrf_stats"])


class _Echo(torch.nn.Module):
    """A stand-in for a model that, after each prompt, generates exactly the reference it was given."""

    def __init__(self, answers: dict[tuple, list[int]], eos: int, pad: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.answers, self.eos, self.pad = answers, eos, pad

    def generate(self, input_ids, attention_mask, generation_config):
        rows = []
        for ids, mask in zip(input_ids.tolist(), attention_mask.tolist()):
            prompt = tuple(t for t, m in zip(ids, mask) if m)
            rows.append(ids + (self.answers[prompt] + [self.eos])[:generation_config.max_new_tokens])
        width = max(len(r) for r in rows)
        return torch.tensor([r + [self.pad] * (width - len(r)) for r in rows])


ROWS = [
    {"prompt": "Chest pain since this morning, ECG shows ST elevation.", "completion": "Refer to cardiology today."},
    {"instruction": "Triage this note", "input": "sudden severe headache and slurred speech",
     "output": "Neurology, urgent stroke pathway."},
    {"messages": [{"role": "user", "content": "knee swollen after a fall"},
                  {"role": "assistant", "content": "Orthopedics clinic within the week."}]},
]


def test_a_perfect_completion_scores_full_marks():
    tok = load_tokenizer("tiny-llama")
    task = CausalLMTask(generate_max_tokens=32, generate_prompts=8)
    examples = task.encode(ROWS, tok, max_length=64)
    echo = _Echo({tuple(e["prompt_ids"]): e["reference_ids"] for e in examples}, tok.eos_token_id, tok.pad_token_id)
    figures = generation_metrics(task.generation_counts(echo, examples, tok))
    assert figures == {"eval_rougeL": pytest.approx(1.0), "eval_bleu": pytest.approx(100.0),
                       "eval_chrf": pytest.approx(100.0)}
    # and the scores of the texts themselves, whatever the tokenizer
    references = [CausalLMTask.split(r, tok)[1] for r in ROWS]
    assert generation_metrics(score_counts(references, references)) == figures


def test_only_the_first_prompts_are_generated_for_and_generation_can_be_off():
    tok = load_tokenizer("tiny-llama")
    rows = ROWS * 3
    task = CausalLMTask(generate_max_tokens=4, generate_prompts=2)
    examples = task.encode(rows, tok, max_length=64)
    assert [("prompt_ids" in e) for e in examples] == [True, True] + [False] * (len(rows) - 2)
    model = load_model(cfg.load_config(None, ["model.name=tiny-llama", "task.type=causal-lm"]), task).model
    counts = evaluate_counts(model, task, examples, tok.pad_token_id, tokenizer=tok)
    assert counts["count"] == len(rows) and counts["generated"] == 2
    off = CausalLMTask(generate_max_tokens=0, generate_prompts=16)
    counts = evaluate_counts(model, off, off.encode(rows, tok, max_length=64), tok.pad_token_id, tokenizer=tok)
    assert "generated" not in counts and not {"eval_rougeL", "eval_bleu", "eval_chrf"} & off.metrics(counts).keys()
    problems = cfg.TaskSection(generate_max_tokens=-1, generate_prompts=-1).problems()
    assert any("task.generate-max-tokens" in p for p in problems)
    assert any("task.generate-prompts" in p for p in problems)


def _sites(tmp_path):
    sites = tmp_path / "sites"
    sites.mkdir()
    for name, word in (("hospital-a", "cardiology"), ("hospital-b", "neurology")):
        rows = [{"prompt": f"Note {i}: {word} patient, route them.", "completion": f"refer to {word} clinic"}
                for i in range(20)]
        (sites / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    test = tmp_path / "test.jsonl"
    test.write_text("".join(json.dumps({"prompt": f"Note {i}: cardiology patient, route them.",
                                        "completion": "refer to cardiology clinic"}) + "\n" for i in range(6)))
    return sites, test


GENERATION = {"eval_rougeL", "eval_bleu", "eval_chrf", "test_rougeL", "test_bleu", "test_chrf"}


@pytest.mark.parametrize("max_tokens", [6, 0])
def test_a_federated_round_reports_generation_metrics_pooled_over_the_sites(tmp_path, max_tokens):
    sites, test = _sites(tmp_path)
    config = cfg.load_config(None, [
        "model.name=tiny-llama", "task.type=causal-lm", f'data.path="{sites}"', f'data.test-path="{test}"',
        "federation.num-sites=2", "federation.rounds=1", f"train.local-steps={4 if max_tokens else 1}",
        "train.learning-rate=0.05",
        "model.max-length=32", f"task.generate-max-tokens={max_tokens}", "task.generate-prompts=8"])
    run = run_inprocess(config, tmp_path / "run")
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    if not max_tokens:
        assert not GENERATION & row.keys() and "eval_perplexity" in row
        assert not any(GENERATION & s.keys() for s in row["eval_sites"].values())
        return
    assert GENERATION <= row.keys()
    for prefix in ("eval", "test"):
        assert 0 <= row[f"{prefix}_rougeL"] <= 1
        assert 0 <= row[f"{prefix}_bleu"] <= 100 and 0 <= row[f"{prefix}_chrf"] <= 100
    # What the sites scored, recomputed here from the final adapter with rouge-score and sacrebleu directly:
    # the coordinator's figures, pooled from the sites' sums, are those of all their completions at once.
    task = build_task(config)
    loaded = load_model(config, task)
    set_peft_model_state_dict(loaded.model, load_file(str(run / "adapter" / "adapter_model.safetensors")))
    loaded.model.eval()
    tok = loaded.tokenizer
    hyps, refs = [], []
    for index in range(2):
        examples = task.encode(simulated_site_data(index, 2, config, task).eval, tok, config.model.max_length)[:8]
        with torch.no_grad():
            generated = greedy_completions(loaded.model, [e["prompt_ids"] for e in examples], tok, max_tokens)
        hyps += [tok.decode(g, skip_special_tokens=True).strip() for g in generated]
        refs += [tok.decode(e["reference_ids"], skip_special_tokens=True).strip() for e in examples]
    rouge = RougeScorer(["rougeL"])
    assert row["eval_rougeL"] == pytest.approx(
        sum(rouge.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(hyps), abs=1e-9)
    assert row["eval_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-9)
    assert row["eval_chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-9)
    assert row["eval_chrf"] > 0  # characters of the answers: a figure to compare, not a trivial zero
