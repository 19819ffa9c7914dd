"""Training samples and batches: tokenized chats, packed text blocks and their collators. Preference
pairs are core.comparisons'; chat rendering and loss masks are core.chat's.

    samples, stats = chat_samples(tokenizer, records, "messages", max_length=1024)
    collate = FlatCollator()      # a batch of different lengths becomes one row: no padding FLOPs
    stats.summary()               # counts, token-length percentiles, truncated samples (never silent)

Padding-free batches: the samples of a batch are concatenated (transformers' DataCollatorWithFlattening)
into one row whose position_ids restart at 0 for every sample and no attention_mask is passed.
transformers then builds a block-diagonal causal mask from the position_ids
(masking_utils.find_packed_sequence_indices; flash-attention kernels read them as cu_seqlens), so no
token attends across samples and the loss equals the padded batch's loss (tests/test_core_models.py
checks both). That detection needs use_cache=False, which the batch carries.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from rlhf_cli.core.chat import keep_answer, prompt_turns, record_messages, render_conversation
from rlhf_cli.core.data import percentiles
from rlhf_cli.errors import DataError

IGNORE = -100


@dataclass
class Stats:
    """What tokenization did to a data set; shown by --dry-run and recorded in run.json."""

    lengths: list[int] = field(default_factory=list)  # tokens per sample before truncation
    samples: int = 0  # samples kept for training
    tokens: int = 0  # tokens kept (after truncation / packing)
    loss_tokens: int = 0  # tokens the loss is computed on
    truncated: int = 0  # samples longer than max_length (cut, and counted)
    dropped: int = 0  # samples left without anything to learn (no loss tokens)

    def summary(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "tokens": self.tokens,
            "loss_tokens": self.loss_tokens,
            "truncated": self.truncated,
            "dropped": self.dropped,
            "length_percentiles": percentiles(self.lengths, (50, 90, 99, 100)),
        }


def chat_samples(
    tokenizer: Any, records: list[dict[str, Any]], fmt: str, max_length: int, completion_only: bool = True
) -> tuple[list[dict[str, list[int]]], Stats]:
    """Conversations rendered with the chat template; labels on assistant tokens when completion_only."""
    samples, stats = [], Stats()
    for record in records:
        # Rendered uncut so the length statistics show how long samples really are; cut here, counted.
        full = render_conversation(tokenizer, record_messages(record, fmt), 1 << 30, completion_only,
                                   prompt_turns(record, fmt))
        stats.lengths.append(len(full.input_ids))
        stats.truncated += len(full.input_ids) > max_length
        ids, labels = keep_answer(tokenizer, full.input_ids, full.labels, max_length)
        n_loss = sum(label != IGNORE for label in labels[1:])
        if n_loss == 0:
            # No answer token (none in the record, or an answer alone longer than max_length cut to nothing).
            stats.dropped += 1
            continue
        samples.append({"input_ids": ids, "labels": labels})
        stats.samples += 1
        stats.tokens += len(ids)
        stats.loss_tokens += n_loss
    return samples, stats


def text_blocks(
    tokenizer: Any, records: list[dict[str, Any]], max_length: int, packing: bool = True, keep_tail: bool = False
) -> tuple[list[dict[str, list[int]]], Stats]:
    """Raw text for causal-LM training.

    packing: documents joined with EOS and cut into max_length blocks (GPT-2 style; nothing is padded or
    truncated, a trailing partial block is kept only when it is the only one, or with keep_tail: a held-out
    set is scored on all its tokens). Without packing each document is one sample, truncated at max_length
    and counted.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no EOS token to separate documents: use a tokenizer with eos_token")
    stats = Stats()
    docs = []
    for record in records:
        text = record["text"]
        if not isinstance(text, str):
            raise DataError(f"text column holds {type(text).__name__}, expected a string")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != eos:  # a post-processor may end texts with EOS already: one between documents
            ids = ids + [eos]
        stats.lengths.append(len(ids))
        docs.append(ids)
    if packing:
        stream = [t for ids in docs for t in ids]
        n_blocks = -(-len(stream) // max_length) if keep_tail else max(1, len(stream) // max_length)
        blocks = [stream[i * max_length : (i + 1) * max_length] for i in range(n_blocks)]
    else:
        stats.truncated = sum(len(ids) > max_length for ids in docs)
        blocks = [ids[:max_length] for ids in docs]
    samples = [{"input_ids": b, "labels": list(b)} for b in blocks if len(b) > 1]
    stats.samples = len(samples)
    stats.tokens = sum(len(s["input_ids"]) for s in samples)
    stats.loss_tokens = stats.tokens - stats.samples
    return samples, stats


class FlatCollator:
    """Padding-free batches for causal-LM training.

    Samples of one length (packed blocks) are stacked as they are; samples of different lengths are
    concatenated into a single row with restarting position_ids by transformers' DataCollatorWithFlattening,
    which also masks the first label of every sample so no sample learns to predict its first token from
    the previous sample's last one.
    """

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self._flatten = DataCollatorWithFlattening()

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        if len({len(f["input_ids"]) for f in features}) == 1:
            return {
                "input_ids": torch.tensor([f["input_ids"] for f in features]),
                "labels": torch.tensor([f["labels"] for f in features]),
            }
        return {
            **self._flatten(features),
            # transformers derives the block-diagonal mask from position_ids only when no KV cache is
            # passed; with the config's use_cache=True it would silently let samples attend to each other.
            "use_cache": False,
        }


class PadCollator:
    """Right-padded batches with an attention mask (the reference the flat batches are tested against)."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, features: list[dict[str, list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        out = {"input_ids": [], "labels": [], "attention_mask": []}
        for f in features:
            gap = width - len(f["input_ids"])
            out["input_ids"].append(f["input_ids"] + [self.pad] * gap)
            out["labels"].append(f["labels"] + [IGNORE] * gap)
            out["attention_mask"].append([1] * len(f["input_ids"]) + [0] * gap)
        return {k: torch.tensor(v) for k, v in out.items()}


def show_loss_mask(tokenizer: Any, input_ids: list[int], labels: list[int]) -> str:
    """The sample as text with the tokens the loss is computed on in [brackets]."""
    parts, run, trained = [], [], None
    for tok, label in zip(input_ids, labels):
        on = label != IGNORE
        if trained is not None and on != trained:
            parts.append(_span(tokenizer, run, trained))
            run = []
        run.append(tok)
        trained = on
    if run:
        parts.append(_span(tokenizer, run, bool(trained)))
    return "".join(parts)


def _span(tokenizer: Any, ids: list[int], trained: bool) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False)
    return f"[{text}]" if trained else text
