"""Score (prompt, response) pairs with a reward model or a rule-based function.

    scorer = load_scorer("runs/rm")                              # a train-rm run, or any seq-cls model
    scorer = load_scorer("rlhf_cli.demo.rewards:vader_sentiment")  # package.module:function
    scores = scorer(prompts, responses)                          # list[float]

A reward run is read through its run.json: base, adapter, score head and chat template are found
without the user knowing how they were saved.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch

from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.recipe import is_function_ref

RewardFn = Callable[[list[Any], list[str]], list[float]]


def load_function(ref: str) -> RewardFn:
    """Import `package.module:function` (user code named explicitly in the recipe or on the command line)."""
    if not is_function_ref(ref):
        raise RecipeError(f"{ref!r} is not package.module:function")
    module_name, _, name = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise RecipeError(f"reward function {ref}: cannot import {module_name} ({e})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise RecipeError(f"reward function {ref}: {module_name} has no callable {name}")

    def call(prompts: list[Any], responses: list[str]) -> list[float]:
        scores = [float(s) for s in fn(prompts, responses)]
        if len(scores) != len(responses):
            raise DataError(f"reward function {ref} returned {len(scores)} scores for {len(responses)} responses")
        return scores

    return call


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Each row's last real token: the position of its attention mask's last 1 (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.to(positions.dtype)).argmax(-1)


def pool_last(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """values[b, last real token of row b] for [B, T, ...] values."""
    rows = torch.arange(values.shape[0], device=values.device)
    return values[rows, last_token_index(attention_mask).to(values.device)]


# Not transformers' pooling: it scores padding if config and tokenizer pad differ (bench/library_choices.py).
def sequence_scores(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A *ForSequenceClassification model's first output at each row's last real token, as fp32 [B].

    Every reward score (train-rm's loss, eval, PPO's reward) is pooled here, by the attention mask.
    transformers pools at the rightmost token that is not config.pad_token_id
    (GenericForSequenceClassification.forward in 5.23), which lands on padding when the tokenizer pads
    with another id (Qwen2.5: pad <|endoftext|>, eos <|im_end|>, config pad unset) and skips a real last
    token that equals that id. Its head runs on every position anyway, so its per-position output is read
    from a forward hook and the pooled one is ignored; the model is still called as a whole, so peft's
    modules_to_save wrapper and a DistributedDataParallel wrapper see a normal forward.
    """
    captured: list[torch.Tensor] = []
    hook = score_head(model).register_forward_hook(lambda _m, _args, out: captured.append(out))
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        hook.remove()
    return pool_last(captured[-1], attention_mask)[:, 0].float()


def score_head(model: Any) -> torch.nn.Module:
    """The outermost module named `score` (the head itself, or peft's wrapper of it)."""
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] == "score":
            return module
    raise TypeError(f"{type(model).__name__} has no `score` head")


class RewardModel:
    """A sequence-classification model with one output, applied to (prompt, answer) pairs.

    Each pair is encoded as train-rm encoded it (core.comparisons.encode_for_scoring: chat template, the
    prompt cut from the left past max_length) and pooled as it pooled (sequence_scores). Pairs are scored
    in batches of similar length, so short answers are not padded to the longest one; `progress` names a
    progress line for long scoring (eval), None keeps it quiet (PPO scores every iteration).
    """

    def __init__(self, model: Any, tokenizer: Any, max_length: int = 1024, batch_size: int = 8,
                 progress: str | None = None, max_length_from: str = "given"):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_length_from = max_length_from  # where max_length came from, for the record
        self.batch_size = batch_size
        self.progress = progress

    def score_ids(self, rows: list[list[int]]) -> list[float]:
        from rlhf_cli.console import Progress

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        with Progress(total=len(rows), description=self.progress or "", unit="answer", enabled=bool(self.progress)) as bar:
            return score_rows(self.model, rows, pad, self.batch_size, on_batch=bar.update)

    def __call__(self, prompts: list[Any], responses: list[str]) -> list[float]:
        from rlhf_cli.core.comparisons import encode_for_scoring

        return self.score_ids([encode_for_scoring(self.tokenizer, p, r, self.max_length) for p, r in zip(prompts, responses)])


@torch.no_grad()
def score_rows(model: Any, rows: list[list[int]], pad_id: int, batch_size: int,
               on_batch: Callable[[int], None] | None = None) -> list[float]:
    """The score of each row of token ids, in the rows' order: scored in batches of similar length (longest
    first, right-padded), so short answers are not padded to the longest one. train-rm's evaluation and
    every scorer of answers go through here."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    out = [0.0] * len(rows)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(rows[i]) for i in chunk)
        ids = torch.tensor([rows[i] + [pad_id] * (width - len(rows[i])) for i in chunk], device=device)
        mask = torch.tensor([[1] * len(rows[i]) + [0] * (width - len(rows[i])) for i in chunk], device=device)
        for i, score in zip(chunk, sequence_scores(model, ids, mask).tolist()):
            out[i] = score
        if on_batch is not None:
            on_batch(min(start + batch_size, len(rows)))
    return out


def trained_max_length(resolved: Any) -> int | None:
    """data.max_length of the run that trained this model (its recipe in run.json), if it is a run."""
    from rlhf_cli.runs import read_manifest

    if not resolved.run_dir:
        return None
    data = ((read_manifest(resolved.run_dir) or {}).get("recipe") or {}).get("data") or {}
    value = data.get("max_length")
    return int(value) if isinstance(value, int) else None


def resolve_reward_model(path: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> Any:
    """runs.resolve_model, refusing a run that is not a reward model. It reads run.json files only, so a
    command that loads its reward model late (compare, after generating) can check it first."""
    from rlhf_cli.core.hub import check_resolved
    from rlhf_cli.runs import resolve_model

    resolved = resolve_model(path, gguf_file, trust_remote_code)
    if resolved.run_dir and resolved.kind != "reward":
        raise RecipeError(f"{path} is a {resolved.kind} run, not a reward model: pass a train-rm run directory")
    check_resolved(resolved)
    return resolved


def load_reward_model(path: str, *, dtype: str = "auto", gguf_file: str | None = None, trust_remote_code: bool = False,
                      max_length: int | None = None, batch_size: int = 8) -> RewardModel:
    """A reward run (or any sequence-classification model), held the way it was trained.

    max_length None scores at the length the run trained with (its recipe's data.max_length; 1024 for a
    model that is not a run), so a reward model is judged on inputs of the shape it learned.

    Its adapters stay live (core.inference.live_adapters) and the score head computes in fp32, as in
    training: folding a LoRA update into bf16 weights, or scoring with a bf16 head, rounds away the small
    score differences that rank two similar answers. A QLoRA reward run loads on its 4-bit base.
    """
    from dataclasses import replace

    from rlhf_cli.core.chat import ensure_chat_template
    from rlhf_cli.core.device import resolve_dtype
    from rlhf_cli.core.inference import live_adapters, run_quant
    from rlhf_cli.core.loading import load_model, load_tokenizer
    from rlhf_cli.core.lora import apply_adapters, fp32_trainable_modules

    resolved = resolve_reward_model(path, gguf_file, trust_remote_code)
    tokenizer = load_tokenizer(resolved, padding_side="right")
    ensure_chat_template(tokenizer)
    quant = run_quant(resolved)
    live = live_adapters(resolved, quant, merge=False)
    base = replace(resolved, adapters=resolved.adapters[: len(resolved.adapters) - len(live)])
    model = load_model(base, dtype=resolve_dtype(dtype), quant=quant, head="reward")
    # Before the adapters load: peft copies the base's head for the adapter's own, and a bf16 copy would
    # round the fp32 head train-rm saved as it loads it. The copies keep the fp32 inputs hook.
    for module in model.modules():
        if type(module).__name__ == "Linear" and module.out_features == 1:
            fp32_trainable_modules(module, all_params=True)
    model = apply_adapters(model, live)
    trained = trained_max_length(resolved)
    if max_length:
        length, source = max_length, "given"
    else:
        length, source = (trained, f"data.max_length of {path}'s recipe") if trained else (1024, "default")
    return RewardModel(model, tokenizer, max_length=length, batch_size=batch_size, max_length_from=source)


def load_scorer(ref: str, **kwargs: Any) -> RewardFn:
    """A reward function reference or a reward model path, as one callable."""
    return load_function(ref) if is_function_ref(ref) else load_reward_model(ref, **kwargs)
