"""Chat rendering shared by sft, train-rm, ppo, eval and generate, so training and inference agree.

The template is the tokenizer's own (or the recipe's `data.chat_template`) and is saved with every run
(tokenizer/), which is what `rlhf generate` applies later: no template drift between stages.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from rlhf_cli.core.data import as_messages
from rlhf_cli.errors import DataError

log = logging.getLogger("rlhf")

# Used only when a tokenizer has no template of its own (a model pretrained from scratch, a GGUF file
# without one). ChatML's role markers as plain text, but every turn ends with the tokenizer's EOS: a
# string that is no token of the vocabulary (ChatML's <|im_end|> in Gemma's) is one the model cannot
# emit as a unit and no sampler stops at, so answers ran on to max_new_tokens.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer: Any) -> None:
    if getattr(tokenizer, "chat_template", None):
        return
    if tokenizer.eos_token is None:
        raise DataError("tokenizer has no chat template and no EOS token to end turns with: set data.chat_template")
    log.warning("tokenizer has no chat template; using ChatML role markers with turns ended by its EOS %r "
                "(set data.chat_template to choose another)", tokenizer.eos_token)
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE


def record_messages(record: dict[str, Any], fmt: str) -> list[dict[str, str]]:
    """The conversation of an sft record: messages as they are, prompt/completion as user/assistant."""
    if fmt == "messages":
        return as_messages(record["messages"], "user")
    if fmt == "prompt_completion":
        return as_messages(record["prompt"], "user") + as_messages(record["completion"], "assistant")
    raise DataError(f"cannot build a conversation from format {fmt}")


def prompt_turns(record: dict[str, Any], fmt: str) -> int:
    """How many of record_messages' leading messages are the prompt: context the model reads, not an answer
    it learns, even where a prompt given as messages holds earlier assistant turns (trl's prompt-completion
    loss is the completion's alone)."""
    return len(as_messages(record["prompt"], "user")) if fmt == "prompt_completion" else 0


@dataclass
class Rendered:
    input_ids: list[int]
    labels: list[int]  # -100 where the loss is off
    truncated: bool


# Not trl's assistant_only_loss: it needs {% generation %} marks or a template it knows (bench/library_choices.py).
def render_conversation(
    tokenizer: Any, messages: list[dict[str, str]], max_length: int, completion_only: bool = True, context: int = 0
) -> Rendered:
    """Tokenize a conversation; labels cover assistant turns only when completion_only, and of those only the
    turns after the first `context` messages (the prompt, see prompt_turns). Past max_length
    the conversation loses its start before any trained token, so the answer survives.

    Assistant spans are found by rendering each prefix of the conversation: the text added by an
    assistant message (its content and the template's end-of-turn tokens) is what the model learns to
    produce, including the end-of-turn marker so generation learns to stop.
    """
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" or i < context:
            continue
        before = (tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i
                  else _opening(tokenizer, m))
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise DataError(
                "chat template renders earlier turns differently once later turns follow; "
                "completion-only loss needs a prefix-stable template (set data.chat_template)"
            )
        spans.append((len(before), len(upto)))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = []
    for tok_id, (start, end) in zip(ids, offsets):
        # A token that holds any of a span's characters is trained (as trl's {% generation %} masks count
        # them): after a generation prompt ending in a space ("Assistant: "), the answer's first word is one
        # token with that space, which starts before the span.
        inside = any(start < e and end > s or (start == end and s < end <= e) for s, e in spans)
        labels.append(tok_id if (inside or not completion_only) else -100)
    truncated = len(ids) > max_length
    ids, labels = keep_answer(tokenizer, ids, labels, max_length)
    return Rendered(ids, labels, truncated)


_PLACEHOLDER = "rlhfanswerplaceholder"


def _opening(tokenizer: Any, message: dict[str, str]) -> str:
    """What the template renders before the content of a conversation's opening assistant message (BOS, a
    default system turn, the role marker): no empty conversation renders, so a placeholder answer shows it."""
    text = tokenizer.apply_chat_template([{**message, "content": _PLACEHOLDER}], tokenize=False)
    return text[: max(text.find(_PLACEHOLDER), 0)]


def keep_answer(tokenizer: Any, ids: list[int], labels: list[int], max_length: int) -> tuple[list[int], list[int]]:
    """ids and labels within max_length, keeping what is learned: the conversation's start goes first (a
    leading BOS stays), up to its first trained token; only then its end."""
    if len(ids) <= max_length:
        return ids, labels
    first = next((i for i, label in enumerate(labels) if label != -100), 0)
    head = 1 if ids and ids[0] == getattr(tokenizer, "bos_token_id", None) else 0
    cut = min(len(ids) - max_length, max(first - head, 0))
    ids, labels = ids[:head] + ids[head + cut :], labels[:head] + labels[head + cut :]
    return ids[:max_length], labels[:max_length]


def prompt_text(tokenizer: Any, prompt: Any, raw: bool = False) -> str:
    """What the model sees before it answers: the chat template with the generation prompt, or raw text.

    Prompts are encoded as they are rendered (no special tokens added), so raw text gets the BOS its
    tokenizer puts before a text here, as pretraining and text perplexity encode it: a Llama or Gemma base
    sampled without its BOS is off the distribution it was trained on."""
    if raw:
        if not isinstance(prompt, str):
            raise DataError("--raw needs plain-text prompts, not message lists")
        bos = getattr(tokenizer, "bos_token", None)
        if bos and not prompt.startswith(bos) and _adds_bos(tokenizer):
            return bos + prompt
        return prompt
    return tokenizer.apply_chat_template(as_messages(prompt, "user"), tokenize=False, add_generation_prompt=True)


def _adds_bos(tokenizer: Any) -> bool:
    """Whether encoding a text with special tokens puts the BOS in front of it."""
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id and ids != tokenizer("a", add_special_tokens=False)["input_ids"]


def conversation_text(tokenizer: Any, prompt: Any, response: Any) -> str:
    """prompt + response as one chat transcript (how a reward model reads a pair)."""
    messages = as_messages(prompt, "user") if prompt not in (None, "") else []
    if isinstance(response, list):
        messages = messages + response
    else:
        messages = messages + [{"role": "assistant", "content": response}]
    return tokenizer.apply_chat_template(messages, tokenize=False)
