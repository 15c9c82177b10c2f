"""What is learned: a task turns rows into batches, losses and metrics."""

from fedlora.tasks.base import Task
from fedlora.tasks.causal_lm import CausalLMTask
from fedlora.tasks.classification import ClassificationTask


def build_task(config) -> Task:
    """The task for a RunConfig."""
    if config.task.type == "classification":
        return ClassificationTask(config.task.text_column, config.task.label_column, config.task.labels)
    return CausalLMTask(config.task.generate_max_tokens, config.task.generate_prompts)


__all__ = ["CausalLMTask", "ClassificationTask", "Task", "build_task"]
