import pytest
import torch

from fedlora.models import load_base_model, load_tokenizer, wrap_with_lora
from fedlora.tasks import CausalLMTask, ClassificationTask
from fedlora.tasks.causal_lm import IGNORE
from fedlora.tasks.classification import macro_f1


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny-llama")


@pytest.fixture(scope="module")
def llama(tok):
    model = load_base_model("tiny-llama", "CAUSAL_LM", 0, tok, seed=0)
    return wrap_with_lora(model, "CAUSAL_LM", 4, 8, 0.0, None).eval()


ROWS = [
    {"prompt": "patient reports chest pain", "completion": "send to cardiology"},
    {"instruction": "Triage this note", "input": "sudden severe headache and slurred speech", "output": "neurology"},
    {"messages": [{"role": "user", "content": "knee swollen after a fall"},
                  {"role": "assistant", "content": "orthopedics, today"}]},
]


def test_completion_tokens_only_carry_the_loss(tok):
    examples = CausalLMTask().encode(ROWS, tok, max_length=64)
    for row, ex in zip(ROWS, examples):
        targets = [t for t in ex["labels"] if t != IGNORE]
        _, completion = CausalLMTask.split(row, tok)
        expected = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        assert targets == expected
        assert ex["labels"][: len(ex["labels"]) - len(targets)] == [IGNORE] * (len(ex["labels"]) - len(targets))


def test_truncation_keeps_the_completion_and_drops_old_prompt_tokens(tok):
    row = {"prompt": "word " * 100, "completion": "answer"}
    ex = CausalLMTask().encode([row], tok, max_length=16)[0]
    assert len(ex["input_ids"]) == 16
    assert [t for t in ex["labels"] if t != IGNORE][-1] == tok.eos_token_id


def test_per_sequence_loss_matches_a_per_example_loop_and_ignores_other_lengths(llama, tok):
    task = CausalLMTask()
    examples = task.encode(ROWS, tok, max_length=64)
    batch_loss = task.per_example_loss(llama, task.collate(examples, tok.pad_token_id))
    for i, ex in enumerate(examples):
        alone = task.per_example_loss(llama, task.collate([ex], tok.pad_token_id))
        assert torch.allclose(batch_loss[i], alone[0], atol=1e-5)
        # By hand: mean over this sequence's completion tokens.
        logits = llama(input_ids=torch.tensor([ex["input_ids"]])).logits[0, :-1]
        target = torch.tensor(ex["labels"][1:])
        keep = target != IGNORE
        by_hand = torch.nn.functional.cross_entropy(logits[keep], target[keep])
        assert torch.allclose(alone[0], by_hand, atol=1e-5)


def test_perplexity_is_exp_of_token_mean_loss():
    m = CausalLMTask().metrics({"loss_sum": 20.0, "tokens": 10, "count": 2})
    assert m["eval_loss"] == 2.0 and abs(m["eval_perplexity"] - 7.389056) < 1e-5


def test_classification_counts_and_macro_f1_match_sklearn():
    from sklearn.metrics import f1_score

    y = [0, 0, 1, 2, 2, 2, 1, 0]
    p = [0, 1, 1, 2, 0, 2, 2, 0]
    k = 3
    tp = [sum(a == c and b == c for a, b in zip(y, p)) for c in range(k)]
    fp = [sum(b == c and a != c for a, b in zip(y, p)) for c in range(k)]
    fn = [sum(a == c and b != c for a, b in zip(y, p)) for c in range(k)]
    assert abs(macro_f1(tp, fp, fn) - f1_score(y, p, average="macro")) < 1e-12


def test_classification_eval_counts_pool_across_batches():
    task = ClassificationTask("text", "label", ["a", "b"])

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])[: len(input_ids)]})

    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long), "attention_mask": torch.ones(3, 2),
             "labels": torch.tensor([0, 0, 1])}
    counts = task.eval_counts(Fixed(), batch)
    assert counts["correct"] == 1 and counts["tp"] == [1, 0] and counts["fp"] == [1, 1] and counts["fn"] == [1, 1]
    pooled = task.add_counts(task.add_counts({}, counts), counts)
    assert pooled["count"] == 6 and pooled["tp"] == [2, 0]
    assert task.metrics(pooled)["eval_accuracy"] == pytest.approx(1 / 3)
