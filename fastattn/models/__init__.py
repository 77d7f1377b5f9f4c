"""Models built from fastattn modules."""

from fastattn.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
