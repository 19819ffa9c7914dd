"""What does the demo's reward model reward? Its score against length, the opening and VADER sentiment.

    python bench/demo_reward_diagnosis.py .demo            # after make demo (or any demo --work folder)

Reads the answers `rlhf eval` judged (runs/eval*/eval.json: the PPO answers and the SFT answers to
data/prompts_eval.jsonl with their reward-model scores, the DPO answers of runs/eval_dpo), scores
the held-out preference pairs (data/preferences_eval.jsonl) with the reward model, and prints Spearman
correlations of the score with:
    tokens     answer length in tokens (the reward model's tokenizer)
    question   the answer contains a question mark (the chats people rated well ask back)
    lines      number of lines (turns, in the chat openings of the preference pairs)
    vader      VADER compound sentiment (rlhf_cli.demo.rewards:vader_sentiment)
and the mean score by first word for the commonest openings. Prints JSON with --json.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path


def features(texts: list[str], tokenizer) -> dict[str, list[float]]:
    from rlhf_cli.demo.rewards import vader_sentiment

    return {
        "tokens": [float(len(tokenizer(t, add_special_tokens=False)["input_ids"])) for t in texts],
        "question": [float("?" in t) for t in texts],
        "lines": [float(len(t.strip().splitlines()) or 1) for t in texts],
        "vader": vader_sentiment([], texts),
    }


def correlations(scores: list[float], feats: dict[str, list[float]]) -> dict[str, float]:
    from rlhf_cli.core.checks import rank_correlation

    return {name: round(rank_correlation(scores, values), 3) for name, values in feats.items()}


def first_words(texts: list[str], scores: list[float], top: int = 6) -> list[tuple[str, int, float]]:
    by: dict[str, list[float]] = {}
    for t, s in zip(texts, scores):
        word = (t.split() or [""])[0].strip(",.!?").lower()
        by.setdefault(word, []).append(s)
    common = Counter({w: len(v) for w, v in by.items()}).most_common(top)
    return [(w, n, round(sum(by[w]) / n, 3)) for w, n in common]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("work", type=Path)
    parser.add_argument("--json", action="store_true", help="Print JSON instead of the table.")
    parser.add_argument("--save", type=Path, help="Also write the figures to this JSON file.")
    args = parser.parse_args()
    from rlhf_cli.core.reward import load_reward_model

    work = args.work
    rm = load_reward_model(str(work / "runs/rm"))
    out: dict[str, dict] = {}

    def report(name: str, prompts: list, texts: list[str], scores: list[float]) -> None:
        feats = features(texts, rm.tokenizer)
        out[name] = {"n": len(texts), "mean_score": round(sum(scores) / len(scores), 3),
                     "mean_tokens": round(sum(feats["tokens"]) / len(texts), 1),
                     "mean_vader": round(sum(feats["vader"]) / len(texts), 3),
                     "share_question": round(sum(feats["question"]) / len(texts), 3),
                     "spearman": correlations(scores, feats), "first_words": first_words(texts, scores)}

    pooled: tuple[list, list, list] = ([], [], [])
    seen_reference = False
    for path in sorted((work / "runs").glob("eval*/eval.json")):
        record = json.loads(path.read_text())
        if "samples" not in record or not record["samples"] or "score" not in record["samples"][0]:
            continue
        samples = record["samples"]
        model = Path(record["recipe"]["model"]["path"]).name
        prompts = [s["prompt"] for s in samples]
        report(f"{model} answers", prompts, [s["response"] for s in samples], [s["score"] for s in samples])
        pooled[0].extend(prompts), pooled[1].extend(s["response"] for s in samples)
        pooled[2].extend(s["score"] for s in samples)
        if not seen_reference and "reference_response" in samples[0]:
            seen_reference = True  # every eval judges against the same SFT answers: count them once
            ref = Path(record["recipe"]["reference"]["path"]).name
            texts = [s["reference_response"] for s in samples]
            report(f"{ref} answers", prompts, texts, [s["reference_score"] for s in samples])
            pooled[0].extend(prompts), pooled[1].extend(texts), pooled[2].extend(s["reference_score"] for s in samples)
    if pooled[1]:
        report("eval answers, pooled", *pooled)

    pairs = [json.loads(line) for line in (work / "data/preferences_eval.jsonl").read_text().splitlines() if line.strip()]
    prompts = [p["prompt"] for p in pairs for _ in (0, 1)]
    texts = [t for p in pairs for t in (p["chosen"], p["rejected"])]
    scores = rm(prompts, texts)
    report("held-out preference pairs (chosen and rejected)", prompts, texts, scores)
    chosen_feats = features([p["chosen"] for p in pairs], rm.tokenizer)
    rejected_feats = features([p["rejected"] for p in pairs], rm.tokenizer)
    out["held-out preference pairs (chosen and rejected)"]["chosen_higher"] = {
        "score": round(sum(scores[2 * i] > scores[2 * i + 1] for i in range(len(pairs))) / len(pairs), 3),
        **{k: round(sum(a > b for a, b in zip(chosen_feats[k], rejected_feats[k])) / len(pairs), 3)
           for k in ("tokens", "vader", "lines")},
    }

    if args.save:
        args.save.write_text(json.dumps(out, indent=2) + "\n")
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for name, row in out.items():
        corr = ", ".join(f"{k} {v:+.2f}" for k, v in row["spearman"].items())
        print(f"{name}: n={row['n']} score {row['mean_score']:.3f} tokens {row['mean_tokens']} vader "
              f"{row['mean_vader']:.3f} question {row['share_question']:.2f}")
        print(f"    Spearman with score: {corr}")
        print("    first words (n, mean score): " + ", ".join(f"{w!r} {n} {s:.2f}" for w, n, s in row["first_words"]))
        if "chosen_higher" in row:
            print(f"    chosen higher: {row['chosen_higher']}")


if __name__ == "__main__":
    main()
