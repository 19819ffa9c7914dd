"""Where rlhf keeps its own code beside a pinned library's equivalent, and the figures that decided it.

    PYTHONPATH=. python bench/library_choices.py            # under a minute on 2 CPU cores

Prints one block per choice:
  - log-probs of sampled tokens: core.generation.token_logprobs against trl's selective_log_softmax, on
    logits [8, 128, 49152] (a rollout micro-batch at SmolLM2's vocabulary), fp32 and bf16: the largest
    error against an fp64 log_softmax, and the median time of 3 calls;
  - entropy: ppo.algo.entropy_from_logits against trl's entropy_from_logits, the same way, plus a row
    with logits masked to -inf (what a top-k / top-p filter leaves);
  - reward pooling: core.reward.sequence_scores against the score transformers pools itself, on a tiny
    sequence-classification Llama whose config pad id is not the tokenizer's (Qwen2.5's arrangement);
  - completion-only masks: core.chat.render_conversation against trl's assistant-only loss, which needs
    {% generation %} markers in the chat template or a template trl knows.
The machine may be shared: times are comparable within one run, not across runs. The choices where the
library's code is used (DataCollatorWithFlattening in core.batches) need no figure: its batches are the
same tensors.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

SHAPE = (8, 128, 49152)


def _median_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def logprobs() -> None:
    from trl.trainer.utils import selective_log_softmax

    from rlhf_cli.core.generation import token_logprobs as logprobs_from_logits

    torch.manual_seed(0)
    base = torch.randn(SHAPE) * 4
    labels = torch.randint(0, SHAPE[-1], SHAPE[:-1])
    print(f"log-probs of sampled tokens, logits {list(SHAPE)}, temperature 0.7")
    for dtype in (torch.float32, torch.bfloat16):
        logits = base.to(dtype)
        exact = (logits.double() / 0.7).log_softmax(-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        for name, fn in (("rlhf", logprobs_from_logits), ("trl", selective_log_softmax)):
            out = fn(logits, labels, 0.7)
            err = (out.double() - exact).abs().max().item()
            seconds = _median_time(lambda fn=fn, logits=logits: fn(logits, labels, 0.7))
            print(f"  {str(dtype)[6:]:9} {name:5} max error {err:.2e}  {seconds * 1000:7.0f} ms  out {out.dtype}")


def entropy() -> None:
    from trl.trainer.utils import entropy_from_logits as trl_entropy

    from rlhf_cli.ppo.algo import entropy_from_logits

    torch.manual_seed(0)
    base = torch.randn(SHAPE) * 4
    print(f"entropy, logits {list(SHAPE)}")
    for dtype in (torch.float32, torch.bfloat16):
        logits = base.to(dtype)
        logp = logits.double().log_softmax(-1)
        exact = -(logp.exp() * logp).sum(-1)
        for name, fn in (("rlhf", entropy_from_logits), ("trl", trl_entropy)):
            err = (fn(logits).double() - exact).abs().max().item()
            seconds = _median_time(lambda fn=fn, logits=logits: fn(logits))
            print(f"  {str(dtype)[6:]:9} {name:5} max error {err:.2e}  {seconds * 1000:7.0f} ms")
    masked = torch.tensor([[0.0, 0.0, -torch.inf, -torch.inf]])
    print(f"  logits [0, 0, -inf, -inf] (exact ln 2 = 0.6931): rlhf {entropy_from_logits(masked).item():.4f}, "
          f"trl {trl_entropy(masked).item():.4f}")


def pooling(tmp: Path) -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from rlhf_cli.core.reward import sequence_scores
    from rlhf_cli.demo.tiny import build_chatml_tokenizer

    tok = AutoTokenizer.from_pretrained(build_chatml_tokenizer(tmp / "chatml"))
    end_of_text = tok.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=end_of_text)
    model = LlamaForSequenceClassification(config).eval()
    rows = [tok("where is the cat?")["input_ids"], tok("the dog is in the garden")["input_ids"]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [tok.pad_token_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.no_grad():
        theirs = model(input_ids=ids, attention_mask=mask).logits[:, 0]
        ours = sequence_scores(model, ids, mask)
        alone = torch.stack([model(input_ids=torch.tensor([r])).logits[0, 0] for r in rows])
    print("reward pooling, right-padded with the tokenizer's pad, config pad_token_id = <|endoftext|>")
    print(f"  each row scored alone  {alone.tolist()}")
    print(f"  rlhf (attention mask)  {ours.tolist()}")
    print(f"  transformers (pad id)  {theirs.tolist()}")


def completion_masks(tmp: Path) -> None:
    from transformers import AutoTokenizer
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    from rlhf_cli.core.chat import DEFAULT_CHAT_TEMPLATE, render_conversation
    from rlhf_cli.demo.tiny import build_tokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp / "tiny"))
    messages = [{"role": "user", "content": "where is the cat?"}, {"role": "assistant", "content": "in the garden"}]
    print("completion-only masks")
    for name, template in (("the fixture's template", tok.chat_template), ("DEFAULT_CHAT_TEMPLATE", DEFAULT_CHAT_TEMPLATE)):
        tok.chat_template = template
        try:
            patched = get_training_chat_template(tok)
            trl = "has markers" if has_generation_markers(template) else f"patched: {patched is not None}"
        except Exception as e:  # trl names the templates it can patch
            trl = f"{type(e).__name__}: {str(e)[:70]}"
        rendered = render_conversation(tok, messages, 256)
        trained = sum(label != -100 for label in rendered.labels)
        print(f"  {name}: rlhf trains {trained} of {len(rendered.labels)} tokens; trl {trl}")


def main() -> None:
    logprobs()
    entropy()
    with tempfile.TemporaryDirectory() as tmp:
        pooling(Path(tmp))
        completion_masks(Path(tmp))


if __name__ == "__main__":
    main()
