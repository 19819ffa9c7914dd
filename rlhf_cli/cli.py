"""The `rlhf` command: thin Typer commands and the single error -> exit-code boundary.

    rlhf sft recipes/tiny/sft.yaml --set train.lr=1e-4 --json
    rlhf ppo --policy runs/sft --reward runs/rm --prompts data/prompts.jsonl

The training stages' commands (pretrain, sft, train-rm, dpo, ppo, grpo) are built by _stage_command from
the options they share; eval, generate, compare and the tools are written out, each its own.

Importing this module must not import torch: --help, validate and schema answer instantly.
Stage modules (which import torch inside run()) are imported only when their command runs.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import inspect
import json
import os
import re
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from rlhf_cli import __version__
from rlhf_cli.errors import GateFailed, RecipeError, RlhfError
from rlhf_cli.recipe import RECIPE_CLASSES, STAGES, is_function_ref
from rlhf_cli.result import jsonl_line

app = typer.Typer(
    name="rlhf",
    help="RLHF pipelines for causal language models: pretrain -> sft -> train-rm -> ppo | grpo, dpo, plus eval and generate.",
    context_settings={"help_option_names": ["-h", "--help"]},
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

# --------------------------------------------------------------------------- shared options

RecipeArg = Annotated[Optional[Path], typer.Argument(help="YAML recipe (optional when flags give the required keys).")]
RequiredRecipeArg = Annotated[Path, typer.Argument(help="YAML recipe.")]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override a recipe key: dotted.key=value (YAML value). Repeatable."),
]
OutputDirOpt = Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Run directory to write.")]
ResumeOpt = Annotated[
    str, typer.Option("--resume", help="auto: continue an interrupted run; never: start over; or a checkpoint PATH.")
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a completed run in the output directory.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
DryRunOpt = Annotated[
    bool, typer.Option("--dry-run", help="Validate and show what would run (samples, lengths, parameters, memory); train nothing.")
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model: hub id, local directory or run directory.")]
DataOpt = Annotated[Optional[str], typer.Option("--data", "-d", help="Training data file or hub dataset (data.train).")]


def _fail(message: str, details: list[str], code: int) -> None:
    from rich.console import Console

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank has decided on this code; the launcher sends SIGTERM to the ranks still running once
        # one has exited, which would turn this rank's code into -15 while it is on its way out.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    err.print(f"[bold red]error:[/] {message}", markup=True) if err.is_terminal else err.print(f"error: {message}", markup=False)
    for line in details:
        err.print(f"error: {line}", markup=False)
    raise typer.Exit(code)


# Conditions of the machine rather than bugs: what to do about each (errno -> fix). Any other error
# is unexpected and keeps its traceback.
_OS_FIXES = {
    errno.ENOSPC: "no space left on the device: free some, or write the run to another disk (--output-dir)",
    errno.EDQUOT: "disk quota exceeded: free some space, or write the run elsewhere (--output-dir)",
    errno.EIO: "the disk failed to write: check its free space and health, or write the run elsewhere (--output-dir)",
    errno.EROFS: "read-only file system: write the run to a writable directory (--output-dir)",
    errno.EACCES: "permission denied: fix its permissions, or use a path you may write (--output-dir)",
    errno.EPERM: "operation not permitted: fix its permissions, or use a path you may write (--output-dir)",
    errno.EEXIST: "a file is in the way of a directory: move it, or choose another --output-dir",
    errno.ENOTDIR: "a file is in the way of a directory: move it, or choose another --output-dir",
    errno.EISDIR: "is a directory, and a file is needed here: choose a file path",
    errno.ENAMETOOLONG: "file name too long: choose a shorter path (--output-dir)",
}
# A missing file is a bug in general (ours, or a missing input that a DataError should have named), but
# not when it is the path the command writes: mkdir of /proc/x, or under a parent that vanished.
_CANNOT_CREATE = "no such file or directory, and it cannot be created there: choose another path (--output-dir)"
# How libraries report a failed write without raising OSError: Rust ones (safetensors, tokenizers) print
# the io::Error as "(os error N)"; torch.save's zip writer raises RuntimeError and drops the errno.
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
_TORCH_WRITER = re.compile(r"inline_container\.cc.*(unexpected pos|PytorchStreamWriter)")


def machine_error(e: BaseException, where: str | None = None) -> str | None:
    """The one line for an error of the machine (disk full, read-only, no permission, a file in the way),
    also when a library wraps it; None for anything else. `where` names the path when the error does not."""
    if isinstance(e, OSError):
        code, path = e.errno, e.filename2 or e.filename
    elif match := _RUST_OS_ERROR.search(str(e)):
        code, path = int(match.group(1)), None
    elif isinstance(e, RuntimeError) and _TORCH_WRITER.search(str(e)):
        code, path = errno.EIO, None
    else:
        return None
    fix = _OS_FIXES.get(code)
    if code == errno.ENOENT and path is not None and where is not None and _is_on_the_way(path, where):
        fix = _CANNOT_CREATE
    if fix is None:
        return None
    path = path or where
    return f"{path}: {fix}" if path else fix


def _is_on_the_way(path: Any, where: str) -> bool:
    """Whether `path` is `where` or one of the directories above it."""
    path, target = Path(os.path.abspath(os.fsdecode(path))), Path(os.path.abspath(where))
    return path == target or path in target.parents


def _boundary(fn: Callable[[], Any], where: str | None = None) -> Any:
    """Expected failures -> one line on stderr + their exit code. RLHF_DEBUG=1 adds the traceback.
    `where`: the path the command writes, named by an error of the machine that names no file."""
    try:
        with _sigterm_interrupts():
            return fn()
    except RlhfError as e:
        _debug_traceback()
        _fail(e.message, e.details, e.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", [], 130)
    except BrokenPipeError:
        # The reader of stdout stopped reading (`rlhf generate ... | head -1`): it has what it wanted.
        _drop_stdout()
        raise typer.Exit(0) from None
    except Exception as e:
        line = machine_error(e, where)
        if line is None:
            raise
        _debug_traceback()
        _fail(line, [], 1)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM (a scheduler's preemption, `docker stop`, a CI timeout) stops a command as Ctrl-C does, outside
    the training loops too (which install their own handlers for both): while a model loads or the final
    model is saved, run.json says interrupted and the exit is 130, where the default action killed the
    process and left a run that still said running."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may install a handler
        return

    def interrupt(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the flush at exit does not meet the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def _write_jsonl(record: dict[str, Any]) -> None:
    """One JSONL line on stdout (result.jsonl_line), flushed. A score that could not be given (NaN) is null:
    strict JSON, and an answer train-rm pairs with none."""
    line = jsonl_line(record)
    sys.stdout.flush()
    buffer = getattr(sys.stdout, "buffer", None)
    if buffer is None:  # a text-only stream put in its place
        sys.stdout.write(line.decode("utf-8"))
    else:
        buffer.write(line)
        buffer.flush()


def _debug_traceback() -> None:
    if os.environ.get("RLHF_DEBUG"):
        traceback.print_exc()


def _setup(verbose: bool) -> None:
    from rlhf_cli.console import setup_logging

    setup_logging(verbose)


def _show_result(result: Any, as_json: bool) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from rlhf_cli.core import distributed

    if not distributed.is_main():
        return  # one result, from rank 0, under several processes
    if as_json:
        sys.stdout.write(json.dumps(result.to_json(), default=str) + "\n")
        sys.stdout.flush()
    err = Console(stderr=True, highlight=False)
    table = Table(title=f"rlhf {result.stage}: {result.status}", show_header=True)
    table.add_column("")
    table.add_column("value", overflow="fold")
    if result.output_dir:
        table.add_row("output_dir", str(result.output_dir))
    for key, value in {**result.metrics, **{k: v for k, v in result.details.items() if not isinstance(v, (dict, list))}}.items():
        # Text, not markup: values such as a rendered sample with [loss spans] print as they are.
        table.add_row(key, Text(f"{value:.4g}" if isinstance(value, float) else str(value)))
    err.print(table)
    for key, value in result.details.items():
        if isinstance(value, (dict, list)):
            err.print(f"{key}:", markup=False)
            err.print(json.dumps(value, indent=2, default=str, ensure_ascii=False), markup=False)


def _run_stage(
    stage: str,
    recipe_path: Optional[Path],
    flags: dict[str, Any],
    sets: Optional[list[str]],
    *,
    output_dir: Optional[str] = None,
    resume: str = "auto",
    overwrite: bool = False,
    as_json: bool = False,
    dry_run: bool = False,
    verbose: bool = False,
) -> Any:
    from rlhf_cli.recipe_load import load_recipe
    from rlhf_cli.result import RunOptions

    _setup(verbose)
    if output_dir is not None:
        flags = {**flags, "output_dir": output_dir}
    recipe = load_recipe(stage, recipe_path, flags=flags, sets=sets)
    if resume not in ("auto", "never"):
        from rlhf_cli.runs import check_resume

        # Before the data is read, and under --dry-run too, which never claims the run directory.
        check_resume(recipe.output_dir, resume)
    if not _launch_ok(stage, recipe):
        return None
    module = importlib.import_module(f"rlhf_cli.stages.{stage.replace('-', '_')}")
    try:
        result = module.run(recipe, RunOptions(resume=resume, overwrite=overwrite, dry_run=dry_run))
    except Exception as e:
        # A write() on a full disk names no file; the run directory is where the stage was writing.
        line = machine_error(e, recipe.output_dir)
        if line is None:
            raise
        raise RlhfError(line) from e
    _show_result(result, as_json)
    return result


def _launch_ok(stage: str, recipe: Any) -> bool:
    """Under several processes: refuse unsupported launches (on every rank alike, exit 2); eval, generate and
    compare run on rank 0 alone, the other ranks are done (False)."""
    from rlhf_cli.core import distributed

    distributed.check_launch(stage, recipe)
    return stage not in ("eval", "generate", "compare") or distributed.is_main()


# --------------------------------------------------------------------------- training stages


def _stage_command(
    stage: str, recipe: Any, inputs: dict[str, Any], flags: Callable[..., dict[str, Any]]
) -> Callable[..., None]:
    """The command of a training stage: RECIPE (`recipe`: RecipeArg, or RequiredRecipeArg with no default), the
    stage's own inputs (name -> annotated type, default None), then the options every training stage takes.
    `flags` turns the inputs into recipe keys. Typer reads the parameters from the signature built here."""

    def command(
        recipe: Optional[Path], set_: Optional[list[str]], output_dir: Optional[str], resume: str, overwrite: bool,
        json_: bool, dry_run: bool, verbose: bool, **given: Optional[str],
    ) -> None:
        _boundary(
            lambda: _run_stage(
                stage, recipe, flags(**given), set_,
                output_dir=output_dir, resume=resume, overwrite=overwrite, as_json=json_, dry_run=dry_run, verbose=verbose,
            )
        )

    def param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
        return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)

    command.__signature__ = inspect.Signature([  # type: ignore[attr-defined]
        param("recipe", recipe, inspect.Parameter.empty if recipe is RequiredRecipeArg else None),
        *(param(name, annotation, None) for name, annotation in inputs.items()),
        param("set_", SetOpt, None),
        param("output_dir", OutputDirOpt, None),
        param("resume", ResumeOpt, "auto"),
        param("overwrite", OverwriteOpt, False),
        param("json_", JsonOpt, False),
        param("dry_run", DryRunOpt, False),
        param("verbose", VerboseOpt, False),
    ])
    return command


def _model_flags(model: Optional[str], data: Optional[str]) -> dict[str, Any]:
    """--model and --data of the trainer stages."""
    return {"model.path": model, "data.train": data}


_MODEL_INPUTS = {"model": ModelOpt, "data": DataOpt}

app.command("pretrain", help="Causal-LM training on raw text: from scratch or continued pretraining.")(
    _stage_command("pretrain", RequiredRecipeArg, _MODEL_INPUTS, _model_flags)
)
app.command("sft", help="Supervised fine-tuning on demonstrations (messages or prompt/completion).")(
    _stage_command("sft", RecipeArg, _MODEL_INPUTS, _model_flags)
)
app.command("train-rm", help="Train a Bradley-Terry reward model on preference pairs.")(
    _stage_command("train-rm", RecipeArg, _MODEL_INPUTS, _model_flags)
)
app.command("dpo", help="Direct Preference Optimization of a policy (usually an sft run) on preference pairs.")(
    _stage_command("dpo", RecipeArg, _MODEL_INPUTS, _model_flags)
)


# The flags rlhf ppo and rlhf grpo share; --reward differs only in which kind of reward its help names first.
PolicyOpt = Annotated[Optional[str], typer.Option("--policy", help="Starting policy: run directory, local model or hub id.")]
PromptsOpt = Annotated[Optional[str], typer.Option("--prompts", help="Prompt file (data.train).")]


def _policy_flags(policy: Optional[str], reward: Optional[str], prompts: Optional[str]) -> dict[str, Any]:
    """--policy, --prompts and --reward of ppo and grpo; --reward replaces the file's reward source, whichever
    kind the file names."""
    from rlhf_cli.recipe_load import UNSET

    flags: dict[str, Any] = {"policy.path": policy, "data.train": prompts}
    if reward is not None:
        use, drop = ("reward.function", "reward.path") if is_function_ref(reward) else ("reward.path", "reward.function")
        flags[use], flags[drop] = reward, UNSET
    return flags


def _policy_inputs(reward_help: str) -> dict[str, Any]:
    """--policy, --reward and --prompts of ppo and grpo."""
    reward = Annotated[Optional[str], typer.Option("--reward", help=reward_help)]
    return {"policy": PolicyOpt, "reward": reward, "prompts": PromptsOpt}


app.command("ppo", help="PPO against a reward model or a rule-based reward function.")(
    _stage_command(
        "ppo", RecipeArg, _policy_inputs("Reward model (train-rm run or model) or package.module:function."), _policy_flags
    )
)
app.command(
    "grpo",
    help="Critic-free RL (GRPO, Dr. GRPO, RLOO, REINFORCE++): a group of answers per prompt, scored by a "
    "rule-based reward function or a reward model.",
)(
    _stage_command(
        "grpo",
        RecipeArg,
        _policy_inputs("package.module:function(prompts, responses) or a reward model (train-rm run)."),
        _policy_flags,
    )
)


def _parse_gates(items: Optional[list[str]], flag: str) -> Optional[dict[str, float]]:
    if not items:
        return None
    gates = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            gates[name.strip()] = float(value)
        except ValueError:
            raise RecipeError(f"{flag} {item!r}: expected metric=number, e.g. {flag} reward=0.5") from None
        if not sep or not name.strip():
            raise RecipeError(f"{flag} {item!r}: expected metric=number, e.g. {flag} reward=0.5")
    return gates


EVAL_HELP = """Compute metrics of a model; gate CI with --fail-under / --fail-over (exit 4).

\b
Metrics (--metric) and the keys they report (the names gates use):
  perplexity   perplexity: all tokens of text data, answer tokens of chat data
  reward       reward, reward_std: reward-model score of the model's answers to --prompts
  win_rate     win_rate, tie_rate: answers vs --reference's, judged by the reward model; ties count half
  kl           kl: mean over the model's samples of sum log p_model - log p_reference
  rm_accuracy  rm_accuracy, rm_margin: reward model on --preference pairs
  length       length, eos_rate, distinct_rate: answer tokens; share ending before max_new_tokens; share of
               different answers (one per prompt)
  reward_fn    reward_fn, reward_fn_std: --reward-fn package.module:function(prompts, responses)
  best_of_n    best_of_n_reward, sample_reward: reward of the best of --set best_of_n=N sampled answers; of one
  dpo_accuracy dpo_accuracy, dpo_margin: a DPO run's implicit reward against its starting model on --preference

A table goes to stderr and the result as JSON to stdout; eval.json is written into --output-dir when given:
a new or empty directory, or an earlier eval's with --overwrite (never a run directory), checked first.
Exit 0 when every gate holds, 4 naming the metric, its value and the gate otherwise."""


@app.command("eval", help=EVAL_HELP)
def eval_(
    recipe: RecipeArg = None,
    model: ModelOpt = None,
    reward: Annotated[Optional[str], typer.Option("--reward", help="Reward model (run directory or model).")] = None,
    reference: Annotated[Optional[str], typer.Option("--reference", help="Reference model for win_rate and kl.")] = None,
    reward_fn: Annotated[Optional[str], typer.Option("--reward-fn", help="package.module:function reward.")] = None,
    metric: Annotated[Optional[list[str]], typer.Option("--metric", help="Metric to compute. Repeatable.")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Prompt file for generation metrics.")] = None,
    text: Annotated[Optional[str], typer.Option("--text", help="Text or chat file for perplexity.")] = None,
    preference: Annotated[Optional[str], typer.Option("--preference", help="Preference pairs for rm_accuracy.")] = None,
    fail_under: Annotated[Optional[list[str]], typer.Option("--fail-under", help="metric=value: exit 4 if below.")] = None,
    fail_over: Annotated[Optional[list[str]], typer.Option("--fail-over", help="metric=value: exit 4 if above.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", help="Answers per prompt.")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Same seed, same metrics.")] = None,
    set_: SetOpt = None,
    output_dir: Annotated[Optional[str], typer.Option("--output-dir", "-o", help="Directory to write eval.json into.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the eval.json of an earlier eval in --output-dir.")] = False,
    json_: Annotated[bool, typer.Option("--json", help="Accepted for symmetry: eval always prints JSON on stdout.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    def go() -> None:
        flags = {
            "model.path": model,
            "reward.path": reward,
            "reference.path": reference,
            "reward_fn": reward_fn,
            "metrics": metric or None,
            "data.prompts": prompts,
            "data.text": text,
            "data.preference": preference,
            "fail_under": _parse_gates(fail_under, "--fail-under"),
            "fail_over": _parse_gates(fail_over, "--fail-over"),
            "num_samples": num_samples,
            "seed": seed,
        }
        # Metrics are eval's result: JSON on stdout always, the table on stderr for people.
        result = _run_stage("eval", recipe, flags, set_, output_dir=output_dir, overwrite=overwrite, as_json=True,
                            verbose=verbose)
        failed = (result.details.get("failed_gates") or []) if result is not None else []
        if failed:
            raise GateFailed(failed[0], details=failed[1:])

    _boundary(go)


@app.command(help="Sample from a model; one JSON object per sample on stdout.")
def generate(
    model: Annotated[str, typer.Argument(help="Run directory, local model or hub id.")],
    prompt: Annotated[Optional[list[str]], typer.Option("--prompt", "-p", help="Prompt text. Repeatable.")] = None,
    prompts: Annotated[Optional[str], typer.Option("--prompts", help="Prompt file (JSONL/JSON/txt), or - for stdin lines.")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens")] = None,
    temperature: Annotated[Optional[float], typer.Option("--temperature")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k")] = None,
    greedy: Annotated[bool, typer.Option("--greedy", help="Greedy decoding (temperature 0).")] = False,
    stop: Annotated[Optional[list[str]], typer.Option("--stop", help="Stop string. Repeatable.")] = None,
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Do not apply the chat template.")] = False,
    merge: Annotated[bool, typer.Option("--merge", help="Merge LoRA adapters in memory first (faster).")] = False,
    best_of: Annotated[bool, typer.Option("--best-of", help="Keep the highest-scoring of --num-samples answers per prompt.")] = False,
    reward: Annotated[
        Optional[str], typer.Option("--reward", help="Scores for --best-of: reward run or model, or package.module:function.")
    ] = None,
    all_: Annotated[bool, typer.Option("--all", help="With --best-of: write every candidate with its score.")] = False,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    def go() -> None:
        from rlhf_cli.recipe_load import load_recipe

        _setup(verbose)
        if not prompt and prompts is None:
            raise RecipeError("no prompts: give --prompt TEXT (repeatable), --prompts FILE, or --prompts - to read stdin")
        flags = {
            "model.path": model,
            "generation.max_new_tokens": max_new_tokens,
            "generation.temperature": 0.0 if greedy else temperature,
            "generation.top_p": top_p,
            "generation.top_k": top_k,
            "generation.stop": stop or None,
            "num_samples": num_samples,
            "seed": seed,
            "batch_size": batch_size,
            "raw": raw or None,
            "merge": merge or None,
            "best_of": best_of or None,
            "reward": reward,
            "all": all_ or None,
        }
        recipe = load_recipe("generate", None, flags=flags, sets=set_)
        if not _launch_ok("generate", recipe):
            return
        stage = importlib.import_module("rlhf_cli.stages.generate")
        for record in stage.generate(recipe, prompt or [], prompts):
            _write_jsonl(record)

    _boundary(go)


@app.command(help="Sample K answers per prompt as ranked data for train-rm: scored by a reward, or left for people to rank.")
def compare(
    model: Annotated[str, typer.Argument(help="Run directory, local model or hub id whose answers to compare.")],
    prompts: Annotated[str, typer.Option("--prompts", help="Prompt file (JSONL/JSON/txt).")],
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", help="Answers per prompt (K >= 2).")] = None,
    reward: Annotated[
        Optional[str], typer.Option("--reward", help="Judge: reward run or model, or package.module:function.")
    ] = None,
    for_labelling: Annotated[
        bool, typer.Option("--for-labelling", help="Shuffled answers with an empty ranking for people to fill in.")
    ] = False,
    temperature: Annotated[Optional[float], typer.Option("--temperature")] = None,
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed")] = None,
    output: Annotated[
        Optional[str],
        typer.Option("--output", "-o", help="Append the lines to this JSONL file instead of stdout; run again to "
                     "continue an interrupted run (the prompts it holds are skipped)."),
    ] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    def go() -> None:
        from rlhf_cli.recipe_load import load_recipe

        _setup(verbose)
        flags = {
            "model.path": model,
            "prompts": prompts,
            "output": output,
            "num_samples": num_samples,
            "reward": reward,
            "for_labelling": for_labelling or None,
            "generation.temperature": temperature,
            "generation.max_new_tokens": max_new_tokens,
            "seed": seed,
        }
        recipe = load_recipe("compare", None, flags=flags, sets=set_)
        if not _launch_ok("compare", recipe):
            return
        stage = importlib.import_module("rlhf_cli.stages.compare")
        for record in stage.compare(recipe):
            _write_jsonl(record)

    _boundary(go, where=output)


# --------------------------------------------------------------------------- tools


@app.command(help="Check recipes without running them (no torch import). Exit 0 when all are valid, 2 otherwise.")
def validate(
    recipes: Annotated[list[Path], typer.Argument(help="Recipe files.")],
    json_: JsonOpt = False,
) -> None:
    from rlhf_cli.recipe_load import load_recipe

    results = []
    for path in recipes:
        try:
            recipe = load_recipe(None, path)
            results.append({"recipe": str(path), "valid": True, "stage": recipe.stage, "errors": []})
        except RlhfError as e:
            results.append({"recipe": str(path), "valid": False, "errors": [e.message, *e.details], "code": e.exit_code})
    if json_:
        sys.stdout.write(json.dumps(results) + "\n")
    for r in results:
        if r["valid"]:
            sys.stderr.write(f"ok: {r['recipe']} ({r['stage']})\n")
        for line in r["errors"]:
            sys.stderr.write(f"error: {line}\n")
    bad = [r for r in results if not r["valid"]]
    if bad:
        raise typer.Exit(max(r["code"] for r in bad))


@app.command(help="Print the JSON Schema of the recipes (all stages, or one).")
def schema(stage: Annotated[Optional[str], typer.Argument(help=f"One of: {', '.join(STAGES)}.")] = None) -> None:
    from rlhf_cli.starter import recipe_schema

    def go() -> None:
        if stage is not None and stage not in RECIPE_CLASSES:
            raise RecipeError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        sys.stdout.write(json.dumps(recipe_schema(stage), indent=2) + "\n")

    _boundary(go)


@app.command(help="Write an annotated starter recipe for a stage.")
def init(
    stage: Annotated[str, typer.Argument(help=f"One of: {', '.join(STAGES)}.")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File to write (default: STAGE.yaml).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing file.")] = False,
) -> None:
    from rlhf_cli.starter import starter_recipe

    def go() -> None:
        if stage not in RECIPE_CLASSES:
            raise RecipeError(f"unknown stage {stage!r} (stages: {', '.join(STAGES)})")
        path = output or Path(f"{stage}.yaml")
        if path.is_dir():
            raise RecipeError(f"--output {path} is a directory: give a file path, e.g. --output {path / f'{stage}.yaml'}")
        if path.exists() and not force:
            raise RecipeError(f"{path} exists: pass --force to replace it, or --output another file")
        from rlhf_cli.runs import atomic_write_text

        atomic_write_text(path, starter_recipe(stage))
        sys.stderr.write(f"wrote {path}; check it with: rlhf validate {path}\n")

    _boundary(go, where=str(output or f"{stage}.yaml"))


@app.command(help="Merge a LoRA run into its base and write a plain transformers model directory.")
def merge(
    run: Annotated[str, typer.Argument(help="Run directory with an adapter.")],
    output: Annotated[Path, typer.Option("--output", help="Directory to write.")],
    dtype: Annotated[str, typer.Option("--dtype", help="auto | bf16 | fp16 | fp32.")] = "auto",
    overwrite: OverwriteOpt = False,
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    def go() -> None:
        _setup(verbose)
        if dtype not in ("auto", "bf16", "fp16", "fp32"):
            raise RecipeError(f"--dtype {dtype!r}: expected auto, bf16, fp16 or fp32")
        stage = importlib.import_module("rlhf_cli.stages.merge")
        _show_result(stage.merge(run, output, dtype=dtype, overwrite=overwrite), json_)

    _boundary(go, where=str(output))


@app.command(help="Write report.html with plots and a summary table for one or more runs.")
def report(
    runs: Annotated[list[Path], typer.Argument(help="Run directories (any stages).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Directory for report.html and the PNG plots.")] = Path("report"),
    json_: JsonOpt = False,
    verbose: VerboseOpt = False,
) -> None:
    def go() -> None:
        _setup(verbose)
        module = importlib.import_module("rlhf_cli.report")
        _show_result(module.report(runs, output), json_)

    _boundary(go, where=str(output))


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"rlhf {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")] = False,
) -> None:
    """RLHF pipelines for causal language models."""


def main() -> None:
    app()


if __name__ == "__main__":
    main()
