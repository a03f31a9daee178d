"""Chat records through a tokenizer's chat template, with the assistant turns marked for training.

Each assistant turn's text is located by rendering the conversation up to it
twice: the template applied to the turns before it with the generation prompt
gives the prefix, the template applied through it gives prefix plus the turn.
The characters in between are the assistant's; tokens whose characters start
there are trained on, everything else (system, user, template markup) is not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tensafe.errors import UsageError


def _render(tokenizer: Any, messages: Sequence[Mapping[str, str]], *, generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    return str(text)


def assistant_spans(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns."""
    if not getattr(tokenizer, "chat_template", None):
        raise UsageError(
            "this model's tokenizer has no chat template (tokenizer_config.json 'chat_template'); "
            "use a chat model, or prompt/completion records"
        )
    full = _render(tokenizer, messages, generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not through.startswith(before) or not full.startswith(through):
            raise UsageError(
                "the model's chat template does not render a conversation as a prefix of its continuation; "
                "its assistant turns cannot be located"
            )
        spans.append((len(before), len(through)))
    return full, spans


def encode_chat(tokenizer: Any, messages: Sequence[Mapping[str, str]]) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it is assistant text."""
    text, spans = assistant_spans(tokenizer, messages)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = [int(t) for t in encoded["input_ids"]]
    mask = [any(lo <= start < hi for lo, hi in spans) for start, _end in encoded["offset_mapping"]]
    return ids, mask
