"""rlhf eval: metrics of a model, and CI gates on them (exit 4 when a gate fails).

    rlhf eval --model runs/ppo --reward runs/rm --reference runs/sft --prompts data/prompts_eval.jsonl \\
        --metric reward --metric win_rate --metric kl --fail-under reward=0.5 --fail-over kl=8

Metric -> output keys (METRIC_KEYS in recipe.py):
    perplexity   perplexity        exp(mean NLL per token): all tokens of text data, answer tokens of chat data
    reward       reward, reward_std, reward_length_corr    reward-model score of the model's own answers to
                                   data.prompts; reward_length_corr: Spearman rank correlation of that score with
                                   the answer's length in tokens over the same answers (NaN if either is constant),
                                   near +-1 when the reward model mostly pays for length
    win_rate     win_rate, tie_rate, reference_reward    answers vs the reference's, judged by the reward model;
                                   ties count half; the reference answers' mean reward. With reward_fn too, a
                                   warning when the reward model prefers the model while reward_fn prefers the reference
    kl           kl                mean over the model's samples of sum_t log p_model - log p_ref (k1 estimate of
                                   KL(model || ref) per answer); sampled at temperature 1 whatever `generation` says,
                                   since the estimate needs samples from the model's own distribution
    rm_accuracy  rm_accuracy, rm_margin   share of preference pairs the reward model orders right; mean score gap
    length       length, eos_rate, mean answer tokens; share of answers that end (EOS / stop string) before max_new_tokens;
                 distinct_rate     share of different answers among the first answer to each prompt (a warning
                                   when one answer serves half the prompts: a collapsed policy)
    reward_fn    reward_fn, reward_fn_std   a user `package.module:function(prompts, responses) -> floats`;
                 reference_reward_fn: its mean over the reference's answers (with win_rate), and
                 reward_fn_gain_se: the standard error of the model's mean gain over the reference on the
                                   same prompts (`rlhf report` calls a gain within two of them inconclusive)

With --output-dir, eval.json holds the result, the recipe (model.path, reference.path, ...) and
`samples`: every answer judged, {prompt, response, finish_reason, completion_tokens, score?, reward_fn?,
reference_response?, reference_score?, reference_reward_fn?}, which `rlhf report` shows side by side.
The directory is checked before anything loads (check_output_dir): a new or empty one, or an earlier
eval's with --overwrite. The eval holds it (runs.hold: a second eval there is refused) and writes eval.json
atomically at the end, so a failing eval leaves the earlier one.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from rlhf_cli.errors import RecipeError
from rlhf_cli.recipe import METRIC_KEYS, EvalRecipe, GenerationSpec
from rlhf_cli.result import RunOptions, RunResult, finite

log = logging.getLogger("rlhf")
EVAL_FILE = "eval.json"


def run(recipe: EvalRecipe, options: RunOptions) -> RunResult:
    if not recipe.output_dir:
        return _evaluate(recipe, options)
    from rlhf_cli.runs import hold

    # Where the result goes is checked first: a refused --output-dir costs no model load and no metric.
    out = Path(recipe.output_dir)
    check_output_dir(out, overwrite=options.overwrite)
    # Held for the whole eval, so a second eval into it is refused at once rather than overwriting this one's
    # eval.json at the end; released (and a directory made for it removed, while empty) however it ends.
    release = hold(out)
    try:
        check_output_dir(out, overwrite=options.overwrite)  # again, held: an eval that ended meanwhile wrote there
        return _evaluate(recipe, options)
    finally:
        release()


def _evaluate(recipe: EvalRecipe, options: RunOptions) -> RunResult:
    from rlhf_cli.core.checks import check_disagrees, distinct_rate, one_answer, paired_gain, rank_correlation
    from rlhf_cli.core.data import detect_format, prompts_of, read_records
    from rlhf_cli.core.inference import load_causal_lm
    from rlhf_cli.core.metrics import check_gates, compare, mean_std, perplexity
    from rlhf_cli.core.reward import RewardModel, load_function, load_scorer, trained_max_length
    from rlhf_cli.runs import atomic_write_json, input_runs, package_versions

    wanted = set(recipe.metrics)
    # Which runs are judged, read before they load: a report tells an eval of a run trained again since.
    judged = input_runs(spec.path for spec in (recipe.model, recipe.reference, recipe.reward) if spec is not None)
    data = recipe.data
    values: dict[str, float] = {}
    details: dict[str, Any] = {}
    samples: list[dict[str, Any]] = []  # what was judged, for eval.json (and `rlhf report`'s side by side)
    read = lambda source: read_records(source, fields=data.fields, max_samples=data.max_samples)  # noqa: E731

    # User code is imported first: a wrong reference fails before any model loads.
    reward_fn = load_function(recipe.reward_fn) if "reward_fn" in wanted and recipe.reward_fn else None
    policy = load_causal_lm(recipe.model) if wanted - {"rm_accuracy"} else None
    scorer = None
    if wanted & {"reward", "win_rate", "rm_accuracy", "best_of_n"}:
        # `rlhf eval --model runs/rm --metric rm_accuracy`: the model given is the reward model.
        r = recipe.reward or recipe.model
        assert r is not None
        # max_length None: the reward run's own (trained_max_length), so it is judged on inputs shaped as in training.
        scorer = load_scorer(r.path, dtype=r.dtype, gguf_file=r.gguf_file, trust_remote_code=r.trust_remote_code,
                             max_length=data.max_length, batch_size=recipe.batch_size)
        if isinstance(scorer, RewardModel):
            details["reward_inputs"] = {"max_length": scorer.max_length, "from": scorer.max_length_from}

    if "perplexity" in wanted:
        assert policy is not None and data.text is not None
        records = read(data.text)
        fmt = detect_format(records, data.text, allowed=("messages", "prompt_completion", "text"))
        if fmt != "text":
            from rlhf_cli.core.chat import ensure_chat_template

            ensure_chat_template(policy.tokenizer)
        length = data.max_length or trained_max_length(policy.resolved) or 1024
        details["perplexity_max_length"] = length
        with _bar(len(records), "eval perplexity") as bar:
            ppl = perplexity(policy.model, policy.tokenizer, records, fmt,
                             max_length=length, batch_size=recipe.batch_size, on_batch=bar.update)
        values["perplexity"] = ppl.perplexity
        details.update(perplexity_tokens=ppl.tokens, perplexity_samples=ppl.samples, truncated=ppl.truncated)

    if "rm_accuracy" in wanted:
        assert scorer is not None and data.preference is not None
        _name_progress(scorer, "eval rm_accuracy")
        gaps, prompts_ranked, skipped = _pair_gaps(scorer, read(data.preference), data.preference)
        values["rm_accuracy"] = sum(g > 0 for g in gaps) / len(gaps)
        values["rm_margin"] = sum(gaps) / len(gaps)
        details.update(preference_pairs=len(gaps), preference_prompts=prompts_ranked, preference_pairs_skipped=skipped)

    if "dpo_accuracy" in wanted:
        assert policy is not None and data.preference is not None
        accuracy, margin, n = _dpo_accuracy(policy, recipe, read(data.preference), data.preference, details)
        values["dpo_accuracy"], values["dpo_margin"] = accuracy, margin
        details["dpo_pairs"] = n

    if wanted & {"reward", "win_rate", "length", "reward_fn", "kl", "best_of_n"}:
        assert policy is not None and data.prompts is not None
        asked = prompts_of(read(data.prompts), data.prompts)
        prompts = [p for p in asked for _ in range(recipe.num_samples)]
        details["answers"] = len(prompts)
        reference = load_causal_lm(recipe.reference) if wanted & {"win_rate", "kl"} else None

        if wanted & {"reward", "win_rate", "length", "reward_fn"}:
            answers = _answer(policy, prompts, recipe.generation, recipe, seed=recipe.seed, what="answers")
            texts = [a.text for a in answers]
            samples = [{"prompt": p, "response": a.text, "finish_reason": a.finish_reason,
                        "completion_tokens": a.completion_tokens} for p, a in zip(prompts, answers)]
            # One answer per prompt: several samples of one prompt may agree without any collapse.
            firsts = texts[::recipe.num_samples]
            if "length" in wanted:
                values["length"] = sum(a.completion_tokens for a in answers) / len(answers)
                values["eos_rate"] = sum(a.finish_reason != "length" for a in answers) / len(answers)
                values["distinct_rate"] = distinct_rate(firsts)
            collapsed = one_answer(firsts)
            if collapsed:
                log.warning("%s", collapsed)
            if wanted & {"reward", "win_rate"}:
                assert scorer is not None
                _name_progress(scorer, "eval reward")
                scores = scorer(prompts, texts)
                values["reward"], values["reward_std"] = mean_std(scores)
                values["reward_length_corr"] = rank_correlation(scores, [a.completion_tokens for a in answers])
                _add(samples, "score", scores)
            if reward_fn is not None:
                fn_scores = reward_fn(prompts, texts)
                values["reward_fn"], values["reward_fn_std"] = mean_std(fn_scores)
                _add(samples, "reward_fn", fn_scores)
            if "win_rate" in wanted:
                assert reference is not None and scorer is not None
                # Another seed: the reference's answers are independent draws, not the same random stream.
                ref_texts = [a.text for a in _answer(reference, prompts, recipe.generation, recipe, seed=recipe.seed + 1,
                                                     what="reference answers")]
                _name_progress(scorer, "eval reward (reference)")
                ref_scores = scorer(prompts, ref_texts)
                _add(samples, "reference_response", ref_texts)
                _add(samples, "reference_score", ref_scores)
                verdict = compare(scores, ref_scores, texts, ref_texts)
                values["win_rate"], values["tie_rate"] = verdict.win_rate, verdict.tie_rate
                values["reference_reward"] = mean_std(ref_scores)[0]
                if reward_fn is not None:
                    ref_fn_scores = reward_fn(prompts, ref_texts)
                    values["reference_reward_fn"] = mean_std(ref_fn_scores)[0]
                    values["reward_fn_gain_se"] = paired_gain(fn_scores, ref_fn_scores, recipe.num_samples)[1]
                    _add(samples, "reference_reward_fn", ref_fn_scores)
                    disagreement = check_disagrees(values["reward"], values["reference_reward"], values["reward_fn"],
                                                   values["reference_reward_fn"], values["reward_fn_gain_se"])
                    if disagreement:
                        log.warning("%s", disagreement)
                details.update(wins=verdict.wins, ties=verdict.ties, losses=verdict.losses)
        if "best_of_n" in wanted:
            assert scorer is not None
            values["best_of_n_reward"], values["sample_reward"] = _best_of_n(policy, scorer, asked, recipe, details)
        if "kl" in wanted:
            assert reference is not None
            values["kl"] = _kl(policy, reference, prompts, recipe)

    metrics = {k: values[k] for m in dict.fromkeys(recipe.metrics) for k in METRIC_KEYS[m] if k in values}
    details["failed_gates"] = check_gates(metrics, recipe.fail_under, recipe.fail_over)
    result = RunResult("eval", "completed", recipe.output_dir, metrics=metrics, details=details)
    if recipe.output_dir:
        record = {**result.to_json(), "samples": samples, "recipe": recipe.model_dump(mode="json"),
                  "inputs": judged, "versions": package_versions()}
        # A sample's score may be NaN (a reward function that could not judge it), as a metric may.
        atomic_write_json(Path(recipe.output_dir) / EVAL_FILE, finite(record))
    return result


def check_output_dir(path: Path, *, overwrite: bool) -> None:
    """May eval write eval.json into path? As a stage with its run directory (runs.prepare_run): a new or
    empty directory, or an earlier eval's (one holding eval.json) with --overwrite, which replaces eval.json
    only. A run directory, or a folder inside one, is never an eval's: run.json's owner clears it when the
    run is trained again, and a reader of the run would take the eval for part of it. Any other non-empty
    directory is the user's, --overwrite or not. Raises RecipeError (exit 2) naming the directory."""
    from rlhf_cli.runs import LOCK, MANIFEST, write_leftover

    in_the_way = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
    if in_the_way is not None:
        raise RecipeError(f"{in_the_way} is a file, not a directory: choose another --output-dir for eval.json")
    run = next((p for p in (path, *path.absolute().parents) if (p / MANIFEST).is_file()), None)
    if run is not None:
        where = f"{path} holds a run" if run == path else f"{path} is inside the run {run}"
        raise RecipeError(f"{where} ({MANIFEST}); an eval writes {EVAL_FILE} into a directory of its own: "
                          "choose another --output-dir")
    if not path.is_dir():
        return
    if (path / EVAL_FILE).is_file():
        if not overwrite:
            raise RecipeError(f"{path} holds an earlier eval ({EVAL_FILE}): pass --overwrite to replace it, "
                              "or choose another --output-dir")
        return
    # A temp file of a write that was killed (runs.atomic_write_text) is not the user's.
    # Nor is the lock of the eval that holds the directory (runs.hold).
    theirs = [c for c in path.iterdir()
              if c.name != LOCK and not write_leftover(c.name, EVAL_FILE)]
    if theirs:
        raise RecipeError(f"{path} is not empty and holds no eval ({EVAL_FILE}): choose a new or empty --output-dir")


def _pair_gaps(scorer: Any, records: list[dict[str, Any]], source: str) -> tuple[list[float], int, int]:
    """r_better - r_worse of every pair of preference pairs or rankings (each answer scored once), the number
    of prompts they came from, and the number of pairs skipped for carrying no signal: the two answers are
    one input to the scorer (the same text, or for a reward model the same transcript within its
    max_length), as train-rm skips them (core.comparisons.comparison_samples). Scored, such a pair's gap is
    0 and would count as a wrong ranking."""
    from rlhf_cli.core.comparisons import answer_text, comparison_of, encode_answers
    from rlhf_cli.core.data import adopt_prompt_alias, check_columns, detect_format
    from rlhf_cli.core.reward import RewardModel
    from rlhf_cli.errors import DataError

    fmt = detect_format(records, source, allowed=("preference", "ranked"))
    records = adopt_prompt_alias(records, fmt, source)
    check_columns(records, fmt, source)  # the first record alone decided the format
    found = [comparison_of(r, fmt, f"{source}: record {n}") for n, r in enumerate(records, 1)]
    if unranked := found.count(None):
        # as train-rm says it: the figure is over the ranked rows only
        log.warning("%s: %d of %d rows have no ranking or scores yet and are skipped", source, unranked, len(records))
    kept, skipped = [], 0
    for c in (c for c in found if c is not None and c.pairs):
        inputs = (encode_answers(scorer.tokenizer, c.prompt, c.responses, scorer.max_length)[0]
                  if isinstance(scorer, RewardModel) else [answer_text(r) for r in c.responses])
        pairs = [(b, w) for b, w in c.pairs if inputs[b] != inputs[w]]
        skipped += len(c.pairs) - len(pairs)
        if pairs:
            kept.append((c, pairs, inputs))
    if skipped:
        log.warning("%s: %d pairs are skipped: their two answers are the same input to the scorer%s", source, skipped,
                    f" within its max_length {scorer.max_length}" if isinstance(scorer, RewardModel) else "")
    if not kept:
        raise DataError(f"{source}: no ranked pair to score (rows without a ranking or scores, and pairs of two "
                        "equal answers, are skipped)")
    if isinstance(scorer, RewardModel):
        scores = iter(scorer.score_ids([ids for _, _, inputs in kept for ids in inputs]))
    else:
        # A reward function judges text: an answer given as messages is handed over as their contents.
        scores = iter(scorer([c.prompt for c, _, _ in kept for _ in c.responses], [t for _, _, inputs in kept for t in inputs]))
    gaps = []
    for c, pairs, _ in kept:
        mine = [next(scores) for _ in c.responses]
        gaps.extend(mine[b] - mine[w] for b, w in pairs)
    return gaps, len(kept), skipped


def _add(samples: list[dict[str, Any]], key: str, values: list[Any]) -> None:
    for sample, value in zip(samples, values, strict=True):
        sample[key] = value


def _name_progress(scorer: Any, description: str) -> None:
    """A reward model's scoring pass shows progress under this name (a rule-based function is instant)."""
    if hasattr(scorer, "progress"):
        scorer.progress = description


def _bar(total: int, description: str) -> Any:
    from rlhf_cli.console import Progress

    return Progress(total=total, description=description, unit="sample")


def _texts(loaded: Any, prompts: list[Any]) -> list[str]:
    from rlhf_cli.core.chat import ensure_chat_template, prompt_text

    ensure_chat_template(loaded.tokenizer)
    return [prompt_text(loaded.tokenizer, p) for p in prompts]


def _answer(loaded: Any, prompts: list[Any], spec: GenerationSpec, recipe: EvalRecipe, *, seed: int, what: str) -> list[Any]:
    from rlhf_cli.core.generation import sample_texts

    with _bar(len(prompts), f"eval {what}") as bar:
        return list(sample_texts(loaded.model, loaded.tokenizer, _texts(loaded, prompts), spec,
                                 batch_size=recipe.batch_size, seed=seed, on_batch=bar.update))


def _best_of_n(policy: Any, scorer: Any, prompts: list[Any], recipe: EvalRecipe, details: dict[str, Any]) -> tuple[float, float]:
    """(mean over prompts of the best of n sampled answers' rewards, mean reward of a single sampled answer):
    best-of-n is the cheapest use of a reward model and the baseline a PPO policy is read against."""
    from rlhf_cli.core.candidates import best_index, sample_groups, score_groups

    spec = recipe.generation
    if spec.temperature == 0:  # n greedy answers would be one answer n times
        spec = spec.model_copy(update={"temperature": 1.0})
    n = recipe.best_of_n
    with _bar(len(prompts) * n, f"eval best-of-{n} answers") as bar:
        groups = sample_groups(policy.model, policy.tokenizer, _texts(policy, prompts), n=n, spec=spec,
                               batch_size=recipe.batch_size, seed=recipe.seed + 3, on_batch=bar.update)
    _name_progress(scorer, f"eval reward (best-of-{n})")
    scores = score_groups(scorer, prompts, groups)
    details.update(best_of_n=n, best_of_n_temperature=spec.temperature)
    # The answer `rlhf generate --best-of` would keep (best_index), so this figure is that command's.
    return sum(g[best_index(g)] for g in scores) / len(scores), sum(map(sum, scores)) / sum(map(len, scores))


def _dpo_accuracy(policy: Any, recipe: EvalRecipe, records: list[dict[str, Any]], source: str,
                  details: dict[str, Any]) -> tuple[float, float, int]:
    """Implicit-reward accuracy of a DPO policy on held-out pairs (Rafailov et al. 2023): the share of pairs
    where beta * (log pi(y|x) - log pi_ref(y|x)) is higher for the chosen answer, and the mean margin of
    those rewards. The pairs are tokenized as dpo trained on them; the reference is --reference, or the
    model the DPO run started from (its parent run, else its base)."""
    from rlhf_cli.core.data import adopt_prompt_alias, check_columns, detect_format
    from rlhf_cli.core.dpo import pair_samples
    from rlhf_cli.core.inference import load_causal_lm
    from rlhf_cli.core.metrics import answer_logprobs
    from rlhf_cli.errors import DataError
    from rlhf_cli.recipe import ModelSpec
    from rlhf_cli.runs import read_manifest

    fmt = detect_format(records, source, allowed=("preference",))
    records = adopt_prompt_alias(records, fmt, source)
    check_columns(records, fmt, source)
    manifest = read_manifest(policy.resolved.run_dir) if policy.resolved.run_dir else None
    dpo_run = manifest if manifest and manifest.get("stage") == "dpo" else None
    reference_spec = recipe.reference
    if reference_spec is None:
        if dpo_run is None:
            raise RecipeError("dpo_accuracy compares against the model the DPO run started from: give --reference, "
                              "or --model a dpo run directory")
        base = dpo_run.get("base_model") or {}
        start = dpo_run.get("parent_run") or (base.get("path") if isinstance(base, dict) else base)
        reference_spec = ModelSpec(path=start, gguf_file=base.get("gguf_file") if isinstance(base, dict) else None)
    beta = recipe.beta or float(((dpo_run or {}).get("recipe") or {}).get("dpo", {}).get("beta", 0.1))
    length = recipe.data.max_length or ((dpo_run or {}).get("recipe") or {}).get("data", {}).get("max_length") or 1024
    pairs, _ = pair_samples(policy.tokenizer, records, int(length))
    if not pairs:
        raise DataError(f"{source}: no pair with two different answers to score")
    reference = load_causal_lm(reference_spec)
    rows = [(p["prompt_ids"], p[k]) for p in pairs for k in ("chosen_ids", "rejected_ids")]
    with _bar(2 * len(rows), "eval dpo_accuracy") as bar:
        mine = answer_logprobs(policy.model, rows, recipe.batch_size, on_batch=bar.update)
        theirs = answer_logprobs(reference.model, rows, recipe.batch_size, on_batch=lambda n: bar.update(len(rows) + n))
    rewards = [beta * (a - b) for a, b in zip(mine, theirs)]
    margins = [rewards[i] - rewards[i + 1] for i in range(0, len(rewards), 2)]
    details.update(dpo_reference=reference_spec.path, dpo_beta=beta)
    return sum(m > 0 for m in margins) / len(margins), sum(margins) / len(margins), len(margins)


def _kl(policy: Any, reference: Any, prompts: list[Any], recipe: EvalRecipe) -> float:
    """Mean sequence KL(model || reference) on the model's own samples, drawn at temperature 1."""
    import torch

    from rlhf_cli.core.generation import response_logprobs, sample_batches
    from rlhf_cli.core.metrics import sequence_kl

    if policy.tokenizer.get_vocab() != reference.tokenizer.get_vocab():
        raise RecipeError("kl compares token log-probs, so the reference must share the model's tokenizer; it does not")
    # The model's own distribution: no temperature, top-p/top-k or stop strings.
    spec = GenerationSpec(max_new_tokens=recipe.generation.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0)
    texts = _texts(policy, prompts)
    kls: list[torch.Tensor] = []
    with _bar(len(texts), "eval kl") as bar:
        for batch in sample_batches(policy.model, policy.tokenizer, texts, spec, batch_size=recipe.batch_size, seed=recipe.seed + 2):
            logp, ref_logp = response_logprobs(policy.model, batch), response_logprobs(reference.model, batch)
            kls.append(sequence_kl(logp, ref_logp.to(logp.device), batch.response_mask.to(logp.device)).float().cpu())
            bar.advance(len(batch.samples))
    return float(torch.cat(kls).mean())
