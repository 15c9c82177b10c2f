"""Causal-LM instruction tuning: the loss covers completion tokens only.

Accepted row shapes:
- `prompt` / `completion`;
- `instruction` / `input` (optional) / `output` (Alpaca-style);
- chat `messages` (list of {role, content}); the last assistant turn is the
  completion, everything before it the prompt, rendered with the tokenizer's
  chat template when it has one.

Evaluation reports the loss and perplexity of the completion tokens and, when
`task.generate-max-tokens` > 0, ROUGE-L, BLEU and chrF of completions generated
greedily for the first `task.generate-prompts` held-out prompts
(fedlora.tasks.generation).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from fedlora.tasks.base import Batch, Example, Task, pad_to
from fedlora.tasks.generation import (
    generation_metrics,
    greedy_completions,
    score_counts,
)

IGNORE = -100
ALPACA_WITH_INPUT = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
ALPACA_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"


def prompt_tail(ids: list[int], max_length: int, new_tokens: int) -> list[int]:
    """A prompt's newest tokens, leaving room within max-length for the `new_tokens` to be generated."""
    return ids[-max(1, max_length - new_tokens):]


def _is_text(value: Any) -> bool:
    return isinstance(value, str) and value.strip() != ""


class CausalLMTask(Task):
    peft_task_type = "CAUSAL_LM"

    def __init__(self, generate_max_tokens: int = 0, generate_prompts: int = 0):
        """`generate_max_tokens` > 0: evaluation also generates that many tokens at most for each of
        the first `generate_prompts` rows of a set and scores them against the rows' completions."""
        self.generate_max_tokens = generate_max_tokens
        self.generate_prompts = generate_prompts if generate_max_tokens > 0 else 0

    def check_row(self, row: dict) -> str | None:
        if "messages" in row:
            msgs = row["messages"]
            if not isinstance(msgs, list) or not msgs:
                return "'messages' must be a non-empty list"
            for i, m in enumerate(msgs):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                    return f"messages[{i}] needs string 'role' and 'content'"
            if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
                return "the last message must be a non-empty assistant turn (it is what is learned)"
            return None
        if "prompt" in row or "completion" in row:
            if not isinstance(row.get("prompt"), str):
                return "'prompt' missing or not text"
            return None if _is_text(row.get("completion")) else "'completion' missing or empty"
        if "instruction" in row:
            if not _is_text(row.get("instruction")):
                return "'instruction' is empty"
            if "input" in row and not isinstance(row["input"], str):
                return "'input' must be text"
            return None if _is_text(row.get("output")) else "'output' missing or empty"
        return "expected prompt/completion, instruction/input/output, or messages"

    @staticmethod
    def split(row: dict, tokenizer) -> tuple[str, str]:
        """(prompt text, completion text) for one row."""
        if "messages" in row:
            history, last = row["messages"][:-1], row["messages"][-1]["content"]
            if getattr(tokenizer, "chat_template", None):
                prompt = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
            else:
                prompt = "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in history) + "<|assistant|>\n"
            return prompt, last
        if "instruction" in row:
            template = ALPACA_WITH_INPUT if row.get("input", "").strip() else ALPACA_NO_INPUT
            return template.format(**{"input": "", **row}), row["output"]
        return row["prompt"], row["completion"]

    def encode(self, rows: list[dict], tokenizer, max_length: int) -> list[Example]:
        """Prompt and completion tokens, the loss on the completion's. The first `generate_prompts`
        rows also keep what generation needs: the prompt (its last `max_length` tokens) and the
        whole reference completion."""
        eos = tokenizer.eos_token_id
        examples = []
        for i, row in enumerate(rows):
            prompt, completion = self.split(row, tokenizer)
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            reference = tokenizer(completion, add_special_tokens=False)["input_ids"]
            c = (reference + ([eos] if eos is not None else []))[:max_length - 1]  # keep a prompt token to predict from
            kept = p[-(max_length - len(c)):] if p else []  # drop the oldest prompt tokens first
            example: Example = {"input_ids": kept + c, "labels": [IGNORE] * len(kept) + c}
            if i < self.generate_prompts:
                example.update(prompt_ids=prompt_tail(p, max_length, self.generate_max_tokens), reference_ids=reference)
            examples.append(example)
        return examples

    def collate(self, examples: list[Example], pad_id: int) -> Batch:
        ids = pad_to([e["input_ids"] for e in examples], pad_id)
        mask = pad_to([[1] * len(e["input_ids"]) for e in examples], 0)
        return {"input_ids": ids, "attention_mask": mask, "labels": pad_to([e["labels"] for e in examples], IGNORE)}

    def _token_losses(self, model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token loss [B, T-1] and its mask; no reduction across examples."""
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        target = batch["labels"][:, 1:]
        logits = logits[:, :-1, :]
        mask = (target != IGNORE)
        losses = F.cross_entropy(
            logits.reshape(-1, logits.size(-1)).float(), target.clamp(min=0).reshape(-1), reduction="none"
        ).view(target.shape)
        return losses * mask, mask

    def per_example_loss(self, model, batch: Batch) -> torch.Tensor:
        # Mean over each sequence's own completion tokens: one example's loss does not
        # depend on the other examples' lengths (the built-in labels= loss does).
        losses, mask = self._token_losses(model, batch)
        return losses.sum(1) / mask.sum(1).clamp(min=1)

    def eval_counts(self, model, batch: Batch) -> dict[str, Any]:
        losses, mask = self._token_losses(model, batch)
        return {"loss_sum": float(losses.sum()), "tokens": int(mask.sum()), "count": int(mask.size(0))}

    def generation_counts(self, model, examples: list[Example], tokenizer) -> dict[str, Any]:
        """ROUGE-L, BLEU and chrF sums of greedy completions of the first `generate_prompts` examples,
        each scored against its reference (both decoded alike, special tokens left out)."""
        chosen = [e for e in examples[:self.generate_prompts] if "prompt_ids" in e]
        if not chosen:
            return {}
        prompts = [e["prompt_ids"] for e in chosen]
        generated = greedy_completions(model, prompts, tokenizer, self.generate_max_tokens)
        hypotheses = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in generated]
        references = [tokenizer.decode(e["reference_ids"], skip_special_tokens=True).strip() for e in chosen]
        return score_counts(hypotheses, references)

    def metrics(self, counts: dict[str, Any]) -> dict[str, float]:
        loss = counts["loss_sum"] / max(counts.get("tokens", 0), 1)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), **generation_metrics(counts)}
