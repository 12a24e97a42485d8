"""Prompt templates.

`alpaca` is MiniLLM's template (LMOps/minillm/tools/process_data_dolly.py), used for training and for
evaluation alike; the paper adds no BOS. `chat` wraps the instruction in the tokenizer's own chat template,
for chat-tuned models such as SmolLM2-Instruct.
"""

from __future__ import annotations

from typing import Any

from minillm.errors import InputError

ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat")


def build_prompt(instruction: str, input: str = "", template: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text for one record; the response follows it directly."""
    if template == "alpaca":
        if input:
            return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
        return ALPACA_NO_INPUT.format(instruction=instruction)
    if template == "chat":
        if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
            raise InputError("template 'chat' needs a tokenizer with a chat_template; use template 'alpaca'")
        content = f"{instruction}\n\n{input}" if input else instruction
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
    raise ValueError(f"unknown template {template!r}; valid: {', '.join(TEMPLATES)}")
