"""The CLI surface: --help of every command, dispatch to a (fake) stage, the error -> exit-code boundary.

Stages are replaced by fake modules in sys.modules, so these tests never train and never depend on
what the real stage modules do today.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from rlhf_cli.cli import app
from rlhf_cli.errors import DataError
from rlhf_cli.recipe import STAGES, PPORecipe, SFTRecipe
from rlhf_cli.result import RunOptions, RunResult

REPO = Path(__file__).resolve().parents[1]
COMMANDS = sorted(typer.main.get_command(app).commands)
runner = CliRunner()


def rlhf(*args: str, env: dict[str, str] | None = None):
    return runner.invoke(app, list(args), env=env)


def rlhf_process(*args: str, code: str = "", stdin_closed: bool = False,
                 reader_gone: bool = False) -> subprocess.CompletedProcess:
    """The real `rlhf` process (exit codes as CI sees them); `code` runs first, e.g. to fake a stage.
    stdin_closed starts it with file descriptor 0 closed, as `rlhf ... <&-` does; reader_gone writes its
    stdout into a pipe that nothing reads any more, as `rlhf ... | head -1` does after the first line."""
    script = f"{code}\nfrom rlhf_cli.cli import main\nmain()\n"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("RLHF_DEBUG", None)
    command = [sys.executable, "-c", script, *args]
    if stdin_closed:
        command = ["sh", "-c", 'exec "$@" <&-', "sh", *command]
    if not reader_gone:
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    read_end, write_end = os.pipe()
    os.close(read_end)  # before the process starts: its first write meets a pipe without a reader
    try:
        return subprocess.run(command, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    finally:
        os.close(write_end)


@pytest.fixture(autouse=True)
def _restore_logging(monkeypatch):
    """Commands call setup_logging(), which binds handlers to the runner's streams and sets env vars."""
    for name in ("HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY", "TOKENIZERS_PARALLELISM", "RLHF_DEBUG"):
        monkeypatch.delenv(name, raising=False)
    loggers = [logging.getLogger(n) for n in ("rlhf", "transformers", "datasets", "peft", "trl", "accelerate", "torch")]
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in loggers]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.fixture
def fake_stage(monkeypatch) -> Callable[..., list[tuple[Any, RunOptions]]]:
    """fake_stage("sft", run=...) puts a module with that run() where the CLI imports the stage from."""

    def install(stage: str, run: Callable[[Any, RunOptions], RunResult] | None = None, **attrs: Any):
        calls: list[tuple[Any, RunOptions]] = []

        def default_run(recipe: Any, options: RunOptions) -> RunResult:
            return RunResult(stage=stage, status="completed", output_dir=recipe.output_dir, metrics={"loss": 1.0})

        def recording_run(recipe: Any, options: RunOptions) -> RunResult:
            calls.append((recipe, options))
            return (run or default_run)(recipe, options)

        # report is no training stage: it lives in its own package beside stages/.
        name = "rlhf_cli.report" if stage == "report" else f"rlhf_cli.stages.{stage.replace('-', '_')}"
        module = types.ModuleType(name)
        module.run = recording_run
        for key, value in attrs.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
        return calls

    return install


@pytest.fixture
def sft_file(tmp_path: Path) -> Path:
    path = tmp_path / "sft.yaml"
    path.write_text(
        "stage: sft\n"
        "model:\n  path: file/model\n"
        "data:\n  train: data/chat.jsonl\n"
        "train:\n  lr: 1.0e-3\n"
        f"output_dir: {tmp_path / 'runs' / 'sft'}\n"
    )
    return path


# --------------------------------------------------------------------------- help and surface


def test_every_command_is_listed_and_counted():
    # A new command joins the parametrized --help test below by itself; this catches an empty listing.
    assert len(COMMANDS) > 10, COMMANDS
    assert {"pretrain", "sft", "train-rm", "ppo", "eval", "generate", "validate", "schema", "init"} <= set(COMMANDS)


@pytest.mark.parametrize("flag", ["--help", "-h"])
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_answers_help(command, flag):
    result = rlhf(command, flag)
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.stdout and command in result.stdout


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_root_help(flag):
    result = rlhf(flag)
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command in result.stdout


def test_version():
    result = rlhf("--version")
    assert result.exit_code == 0
    assert result.stdout.startswith("rlhf ")


def test_unknown_command_exits_nonzero():
    proc = rlhf_process("frobnicate")
    assert proc.returncode != 0
    assert "frobnicate" in proc.stderr


# --------------------------------------------------------------------------- dispatch to a stage


def test_stage_result_is_json_on_stdout_and_options_arrive(fake_stage, sft_file, tmp_path):
    calls = fake_stage("sft")
    out = tmp_path / "elsewhere"
    result = rlhf(
        "sft", str(sft_file), "--json", "--resume", "never", "--overwrite", "--dry-run",
        "--output-dir", str(out), "--set", "train.lr=2e-4",
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)  # stdout holds the result and nothing else
    assert payload["stage"] == "sft"
    assert payload["status"] == "completed"
    assert payload["metrics"] == {"loss": 1.0}
    assert payload["output_dir"] == str(out)

    [(recipe, options)] = calls
    assert isinstance(recipe, SFTRecipe)
    assert recipe.output_dir == str(out)
    assert recipe.train.lr == 2e-4
    assert options == RunOptions(resume="never", overwrite=True, dry_run=True)


def test_stage_default_options(fake_stage, sft_file):
    calls = fake_stage("sft")
    result = rlhf("sft", str(sft_file))
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # without --json the summary goes to stderr only
    assert "completed" in result.stderr
    [(_, options)] = calls
    assert options == RunOptions(resume="auto", overwrite=False, dry_run=False)


def test_resume_path_is_passed_through(fake_stage, sft_file, tmp_path):
    calls = fake_stage("sft")
    checkpoint = tmp_path / "runs" / "sft" / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)  # the CLI checks that it is one of the run's checkpoints
    assert rlhf("sft", str(sft_file), "--resume", str(checkpoint)).exit_code == 0
    assert calls[0][1].resume == str(checkpoint)


def test_precedence_file_then_flags_then_set(fake_stage, sft_file):
    calls = fake_stage("sft")
    assert rlhf("sft", str(sft_file)).exit_code == 0
    assert rlhf("sft", str(sft_file), "--model", "flag/model").exit_code == 0
    assert rlhf("sft", str(sft_file), "--model", "flag/model", "--set", "model.path=set/model").exit_code == 0
    assert rlhf("sft", str(sft_file), "-o", "flag/out", "--set", "output_dir=set/out").exit_code == 0
    assert [c[0].model.path for c in calls] == ["file/model", "flag/model", "set/model", "file/model"]
    assert calls[3][0].output_dir == "set/out"
    assert calls[0][0].train.lr == 1e-3  # the file beats the schema default (2e-4)


def test_recipe_file_is_optional_when_flags_give_required_keys(fake_stage):
    calls = fake_stage("sft")
    result = rlhf("sft", "--model", "some/model", "--data", "data/chat.jsonl")
    assert result.exit_code == 0, result.output
    assert calls[0][0].model.path == "some/model"
    assert calls[0][0].data.train == "data/chat.jsonl"


PPO_FLAGS = ("--policy", "runs/sft", "--prompts", "data/prompts.jsonl")


def test_ppo_reward_function_flag_routes_to_reward_function(fake_stage):
    calls = fake_stage("ppo")
    result = rlhf("ppo", *PPO_FLAGS, "--reward", "mypkg.mod:fn")
    assert result.exit_code == 0, result.output
    recipe = calls[0][0]
    assert isinstance(recipe, PPORecipe)
    assert (recipe.reward.function, recipe.reward.path) == ("mypkg.mod:fn", None)
    assert recipe.policy.path == "runs/sft"
    assert recipe.data.train == "data/prompts.jsonl"


def test_ppo_reward_run_flag_routes_to_reward_path(fake_stage):
    calls = fake_stage("ppo")
    assert rlhf("ppo", *PPO_FLAGS, "--reward", "runs/rm").exit_code == 0
    assert (calls[0][0].reward.path, calls[0][0].reward.function) == ("runs/rm", None)


@pytest.mark.parametrize(
    ("in_file", "flag", "expected"),
    [
        ("path: runs/rm", "mypkg.mod:fn", ("mypkg.mod:fn", None)),
        ("function: mypkg.mod:fn", "runs/rm", (None, "runs/rm")),
    ],
)
def test_ppo_reward_flag_replaces_the_files_reward_source(fake_stage, tmp_path, in_file, flag, expected):
    calls = fake_stage("ppo")
    recipe = tmp_path / "ppo.yaml"
    recipe.write_text(f"stage: ppo\npolicy: {{path: runs/sft}}\nreward: {{{in_file}}}\ndata: {{train: p.jsonl}}\n")
    result = rlhf("ppo", str(recipe), "--reward", flag)
    assert result.exit_code == 0, result.output
    assert (calls[0][0].reward.function, calls[0][0].reward.path) == expected


def test_eval_gate_failure_exits_4(fake_stage, tmp_path):
    def run(recipe, options):
        assert recipe.fail_under == {"reward": 0.5}
        return RunResult(
            stage="eval", status="completed", output_dir=None, metrics={"reward": 0.1},
            details={"failed_gates": ["reward 0.1 < 0.5 (--fail-under reward=0.5)"]},
        )

    fake_stage("eval", run)
    result = rlhf(
        "eval", "--model", "runs/ppo", "--reward", "runs/rm", "--metric", "reward",
        "--prompts", "p.jsonl", "--fail-under", "reward=0.5",
    )
    assert result.exit_code == 4, result.output
    assert "reward 0.1 < 0.5" in result.stderr


@pytest.mark.parametrize("gate", ["reward", "reward=high", "=0.5"])
def test_eval_gate_syntax_error_exits_2(fake_stage, gate):
    calls = fake_stage("eval")
    result = rlhf("eval", "--model", "m", "--metric", "length", "--prompts", "p.jsonl", "--fail-under", gate)
    assert result.exit_code == 2, result.output
    assert "metric=number" in result.stderr
    assert calls == []


def test_generate_without_prompts_exits_2(fake_stage):
    fake_stage("generate")
    result = rlhf("generate", "some/model")
    assert result.exit_code == 2
    assert "--prompt" in result.stderr


# --------------------------------------------------------------------------- the error boundary


def _raise(exc: Exception) -> Callable[[Any, RunOptions], RunResult]:
    def run(recipe: Any, options: RunOptions) -> RunResult:
        raise exc

    return run


def test_data_error_is_one_line_and_exit_3(fake_stage, sft_file):
    fake_stage("sft", _raise(DataError("data/chat.jsonl:7: not valid JSON")))
    result = rlhf("sft", str(sft_file))
    assert result.exit_code == 3
    assert result.stderr.strip().splitlines() == ["error: data/chat.jsonl:7: not valid JSON"]
    assert result.stdout == ""


def test_rlhf_debug_adds_the_traceback(fake_stage, sft_file):
    fake_stage("sft", _raise(DataError("data/chat.jsonl:7: not valid JSON")))
    result = rlhf("sft", str(sft_file), env={"RLHF_DEBUG": "1"})
    assert result.exit_code == 3
    assert "Traceback" in result.stderr
    assert "error: data/chat.jsonl:7: not valid JSON" in result.stderr


def test_unexpected_exception_is_not_swallowed(fake_stage, sft_file):
    fake_stage("sft", _raise(RuntimeError("bug")))
    result = rlhf("sft", str(sft_file))
    assert result.exit_code == 1
    assert isinstance(result.exception, RuntimeError)


def test_exit_codes_of_the_real_process(sft_file):
    fake = (
        "import sys, types\n"
        "from rlhf_cli.errors import DataError\n"
        "m = types.ModuleType('rlhf_cli.stages.sft')\n"
        "def run(recipe, options):\n"
        "    raise DataError('data/chat.jsonl: file not found')\n"
        "m.run = run\n"
        "sys.modules['rlhf_cli.stages.sft'] = m\n"
    )
    proc = rlhf_process("sft", str(sft_file), code=fake)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == ["error: data/chat.jsonl: file not found"]

    proc = rlhf_process("sft", str(sft_file), "--set", "train.lr", code=fake)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --set 'train.lr'")


# --------------------------------------------------------------------------- the machine's errors and bad input, end to end


def _fake_sft_raising(expr: str) -> str:
    """Code for rlhf_process: an sft stage whose run() raises `expr`."""
    return (
        "import errno, sys, types\n"
        "m = types.ModuleType('rlhf_cli.stages.sft')\n"
        "def run(recipe, options):\n"
        f"    raise {expr}\n"
        "m.run = run\n"
        "sys.modules['rlhf_cli.stages.sft'] = m\n"
    )


@pytest.mark.parametrize(
    ("expr", "where", "fix"),
    [
        ("OSError(errno.ENOSPC, 'No space left on device')", "OUT", "no space left on the device"),
        ("OSError(errno.EROFS, 'Read-only file system', 'OUT/run.json')", "OUT/run.json", "read-only file system"),
        ("PermissionError(errno.EACCES, 'Permission denied', 'OUT/checkpoints')", "OUT/checkpoints", "permission denied"),
    ],
    ids=["disk-full", "read-only", "no-permission"],
)
def test_os_errors_while_writing_are_one_line_and_exit_1(sft_file, tmp_path, expr, where, fix):
    out = str(tmp_path / "runs" / "sft")
    before = sft_file.read_bytes()
    proc = rlhf_process("sft", str(sft_file), code=_fake_sft_raising(expr.replace("OUT", out)))
    assert proc.returncode == 1, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {where.replace('OUT', out)}: {fix}") and "--output-dir" in line, line
    assert sft_file.read_bytes() == before


@pytest.mark.parametrize(
    ("error", "line"),
    [
        # safetensors saving an adapter onto a full disk (its message, verbatim)
        (type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: No space left on device (os error 28)"),
         "runs/x: no space left on the device"),
        # torch.save's zip writer on a full disk drops the errno
        (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"), "runs/x: the disk failed to write"),
        (OSError(errno.EISDIR, "Is a directory", "runs/.a.tmp", None, "runs/a"), "runs/a: is a directory"),
        (OSError(errno.EROFS, "Read-only file system", "/ro/run.json"), "/ro/run.json: read-only file system"),
        (OSError(errno.ENOENT, "No such file or directory", "x"), None),
        (OSError(errno.ENOENT, "No such file or directory", "runs/x"), "runs/x: no such file or directory, and it cannot"),
        (OSError(errno.ENOENT, "No such file or directory", "runs"), "runs: no such file or directory, and it cannot"),
        (OSError(errno.ENOENT, "No such file or directory", "runs/x/run.json"), None),
        (RuntimeError("shape mismatch"), None),
        (ValueError("(os error 2) in a message of ours"), None),
    ],
    ids=["safetensors", "torch-save", "rename-onto-dir", "read-only", "enoent-is-a-bug", "enoent-making-the-output",
         "enoent-making-its-parent", "enoent-inside-the-output", "bug", "unknown-errno"],
)
def test_machine_errors_are_recognised_also_when_a_library_wraps_them(error, line):
    from rlhf_cli.cli import machine_error

    found = machine_error(error, "runs/x")
    assert (found is None) if line is None else found.startswith(line), found


def test_other_os_errors_keep_their_traceback(fake_stage, sft_file):
    fake_stage("sft", _raise(OSError(errno.ENOENT, "No such file or directory", "somewhere")))
    result = rlhf("sft", str(sft_file))
    assert result.exit_code == 1
    assert isinstance(result.exception, FileNotFoundError)


def test_rlhf_debug_adds_the_traceback_of_an_os_error(fake_stage, sft_file):
    fake_stage("sft", _raise(OSError(errno.ENOSPC, "No space left on device")))
    result = rlhf("sft", str(sft_file), env={"RLHF_DEBUG": "1"})
    assert result.exit_code == 1
    assert "Traceback" in result.stderr and "no space left on the device" in result.stderr


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_resume_path_that_is_no_checkpoint_is_refused_before_the_stage_runs(fake_stage, sft_file, tmp_path, dry_run):
    calls = fake_stage("sft")
    result = rlhf("sft", str(sft_file), "--resume", "autoo", *(["--dry-run"] if dry_run else []))
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines() == ["error: --resume autoo: checkpoint directory not found (did you mean --resume auto?)"]
    assert calls == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("command", ["init", "merge", "report"])
def test_a_full_disk_names_the_output_of_the_tools_too(fake_stage, monkeypatch, tmp_path, command):
    # A write() on a full disk names no file: the line names what the command was writing.
    def full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    if command == "init":
        monkeypatch.setattr("rlhf_cli.runs.atomic_write_text", full)
        args = ["init", "sft", "--output", str(out)]
    else:
        fake_stage(command, **{command: full})
        args = ["merge", "runs/sft", "--output", str(out)] if command == "merge" else ["report", "runs/sft", "-o", str(out)]
    result = rlhf(*args)
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [f"error: {out}: no space left on the device: free some, "
                                                  "or write the run to another disk (--output-dir)"]


def test_disk_full_mid_run_marks_it_failed_and_keeps_its_checkpoints(fake_stage, sft_file, tmp_path):
    from rlhf_cli.core.trainer import failure_marked
    from rlhf_cli.runs import prepare_run

    out = tmp_path / "runs" / "sft"

    def run(recipe, options):
        run_dir = prepare_run(recipe.output_dir, "sft", "stage: sft\n", {})
        with failure_marked(run_dir):
            (out / "checkpoints" / "checkpoint-2").mkdir(parents=True)
            (out / "checkpoints" / "checkpoint-2" / "COMPLETE").write_text("")
            raise OSError(errno.ENOSPC, "No space left on device")

    fake_stage("sft", run)
    result = rlhf("sft", str(sft_file))
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [f"error: {out}: no space left on the device: free some, "
                                                  "or write the run to another disk (--output-dir)"]
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
    assert (out / "checkpoints" / "checkpoint-2" / "COMPLETE").exists()


def test_output_dir_that_is_a_file_is_one_line_and_exit_1(fake_stage, sft_file, tmp_path):
    from rlhf_cli.runs import prepare_run

    fake_stage("sft", lambda recipe, options: prepare_run(recipe.output_dir, "sft", "stage: sft\n", {}))
    taken = tmp_path / "notes.txt"
    taken.write_bytes(b"my notes\n")
    result = rlhf("sft", str(sft_file), "--output-dir", str(taken))
    assert result.exit_code == 1, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {taken}: a file is in the way") and "--output-dir" in line, line
    assert taken.read_bytes() == b"my notes\n"


@pytest.mark.parametrize("where", ["long", "proc"])
def test_an_output_dir_that_cannot_be_made_is_one_line_and_exit_1(fake_stage, sft_file, tmp_path, where):
    """A name longer than the file system allows (ENAMETOOLONG), and a directory mkdir cannot create (ENOENT
    from mkdir under /proc), name the path and the fix instead of a traceback."""
    from rlhf_cli.runs import prepare_run

    fake_stage("sft", lambda recipe, options: prepare_run(recipe.output_dir, "sft", "stage: sft\n", {}))
    out, fix = {
        "long": (str(tmp_path / ("a" * 300)), "file name too long: choose a shorter path (--output-dir)"),
        "proc": ("/proc/rlhf-cannot-be-made", "no such file or directory, and it cannot be created there"),
    }[where]
    result = rlhf("sft", str(sft_file), "--output-dir", out)
    assert result.exit_code == 1, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"error: {out}: {fix}") and "--output-dir" in line, line


def test_init_with_a_file_name_too_long_is_one_line_and_exit_1(tmp_path):
    path = tmp_path / ("a" * 300 + ".yaml")
    result = rlhf("init", "sft", "-o", str(path))
    assert result.exit_code == 1, result.output
    assert result.stderr.strip().splitlines() == [f"error: {path}: file name too long: choose a shorter path (--output-dir)"]


def test_prompts_that_are_not_utf8_are_one_line_and_exit_3(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    proc = rlhf_process("generate", "some/model", "--prompts", str(prompts))
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {prompts}:2: not UTF-8 text (byte 0xe9); convert the file, "
                                                "e.g. iconv -f latin1 -t utf-8"]
    assert prompts.read_bytes() == b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n'


@pytest.fixture
def hub_unreachable(monkeypatch, tmp_path):
    """Online mode with a hub that refuses connections (a closed local port) and an empty cache: what an
    offline machine without HF_HUB_OFFLINE sees, without touching the network."""
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


@pytest.mark.parametrize("model", ["work/nope", "./work/nope", "ABS/nope"])
def test_a_missing_local_model_is_named_without_asking_the_hub(tiny, tmp_path, monkeypatch, model):
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    model = model.replace("ABS", str(tmp_path))
    result = rlhf("sft", "--model", model, "--data", str(tiny["chat"]), "--dry-run")
    assert result.exit_code == 3, result.output
    assert result.stderr.strip().splitlines() == [
        f"error: {model}: no such file or directory (a local model directory, so not looked up on the hub)"]


def test_a_hub_id_that_is_not_cached_and_not_reachable_is_one_line_without_retries(hub_unreachable):
    # The real process and the real huggingface_hub: its retries would take 23 s per file and print a line each.
    proc = rlhf_process("sft", "--model", "someone/nothing-here", "--data", "data/chat.jsonl", "--dry-run")
    assert proc.returncode == 3, proc.stderr
    [line] = [line for line in proc.stderr.strip().splitlines() if " INFO " not in line]
    assert line.startswith("error: someone/nothing-here: neither a local path nor reachable on the hub (ConnectError"), line
    assert "cached locally" in line


def test_a_hub_dataset_that_is_not_cached_and_not_reachable_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub

    from rlhf_cli.core.data import read_records

    def unreachable(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "repo_info", unreachable)
    with pytest.raises(DataError) as e:
        read_records("someone/dataset")
    assert e.value.message.startswith("someone/dataset: neither a local path nor reachable on the hub (ConnectionError"), e.value.message


@pytest.mark.parametrize(
    ("ref", "local"),
    [("./m", True), ("../m", True), ("/abs/m", True), ("~/m", True), (".assets/tiny/model", True), ("a/b/c", True),
     ("work/m", True), ("someone/model", False), ("gpt2", False)],
)
def test_which_references_are_local_paths(tmp_path, monkeypatch, ref, local):
    from rlhf_cli.core.hub import is_local_path

    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path)
    assert is_local_path(ref) is local


def test_generate_with_a_closed_stdin_is_one_line_and_exit_3():
    proc = rlhf_process("generate", "some/model", "--prompts", "-", stdin_closed=True)
    assert proc.returncode == 3, proc.stderr
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("error: --prompts - reads prompts from stdin, but stdin is closed"), line


def test_a_reader_that_stops_reading_ends_the_command_quietly_with_0():
    """`rlhf schema | head -1`: the closed pipe is the reader's choice, not a failure, and prints nothing."""
    proc = rlhf_process("schema", "sft", reader_gone=True)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_duplicate_recipe_key_is_one_line_and_exit_2(tmp_path):
    recipe = tmp_path / "sft.yaml"
    recipe.write_text("stage: sft\nmodel: {path: m}\ndata: {train: d.jsonl}\ntrain:\n  lr: 1.0e-3\n  lr: 1.0e-1\n")
    proc = rlhf_process("sft", str(recipe))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: {recipe}:6:3: invalid YAML: key 'lr' given twice (first on line 5); keep one"
    ]


# --------------------------------------------------------------------------- validate, schema, init


def test_validate_several_files_one_bad(sft_file, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\nmodel: {path: m}\ndata: {train: d.jsonl}\ntrian: {lr: 1}\n")
    result = rlhf("validate", str(sft_file), str(bad), "--json")
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert [(r["recipe"], r["valid"]) for r in report] == [(str(sft_file), True), (str(bad), False)]
    assert "did you mean train?" in report[1]["errors"][0]
    assert f"ok: {sft_file} (sft)" in result.stderr
    assert f"error: {bad}:4: trian: unknown key" in result.stderr


def test_validate_missing_file_exits_3(sft_file, tmp_path):
    proc = rlhf_process("validate", str(sft_file), str(tmp_path / "nope.yaml"))
    assert proc.returncode == 3
    assert "nope.yaml: recipe file not found" in proc.stderr


def test_schema_is_json_for_all_stages_and_one():
    result = rlhf("schema")
    assert result.exit_code == 0
    schema = json.loads(result.stdout)
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "$defs" in schema

    result = rlhf("schema", "sft")
    assert result.exit_code == 0
    sft = json.loads(result.stdout)
    assert sft["title"]
    assert sft["additionalProperties"] is False
    assert {"stage", "model", "data", "train"} <= set(sft["properties"])


def test_schema_of_unknown_stage_exits_2():
    result = rlhf("schema", "rlhf")
    assert result.exit_code == 2
    assert "unknown stage" in result.stderr


@pytest.mark.parametrize("stage", STAGES)
def test_init_writes_a_recipe_that_validates(stage, tmp_path):
    path = tmp_path / f"{stage}.yaml"
    result = rlhf("init", stage, "-o", str(path))
    assert result.exit_code == 0, result.output
    assert path.read_text().startswith("# yaml-language-server: $schema=")
    result = rlhf("validate", str(path))
    assert result.exit_code == 0, result.output
    assert f"({stage})" in result.stderr


def test_init_refuses_to_overwrite_without_force(tmp_path):
    path = tmp_path / "sft.yaml"
    path.write_text("mine\n")
    result = rlhf("init", "sft", "-o", str(path))
    assert result.exit_code == 2
    assert "--force" in result.stderr
    assert path.read_text() == "mine\n"

    result = rlhf("init", "sft", "-o", str(path), "--force")
    assert result.exit_code == 0
    assert "stage: sft" in path.read_text()


@pytest.mark.parametrize("force", [False, True])
def test_init_into_a_directory_asks_for_a_file_path(tmp_path, force):
    (tmp_path / "recipes").mkdir()
    result = rlhf("init", "sft", "--output", str(tmp_path / "recipes"), *(["--force"] if force else []))
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        f"error: --output {tmp_path / 'recipes'} is a directory: give a file path, e.g. --output {tmp_path / 'recipes' / 'sft.yaml'}"]
    assert list((tmp_path / "recipes").iterdir()) == []


def test_init_unknown_stage_exits_2(tmp_path):
    result = rlhf("init", "rm", "-o", str(tmp_path / "x.yaml"))
    assert result.exit_code == 2
    assert not (tmp_path / "x.yaml").exists()


def test_undefined_numbers_are_null_in_the_json_result(fake_stage, sft_file):
    """A correlation over answers of one length is NaN: --json prints strict JSON (null), not NaN."""
    import math

    from rlhf_cli.result import RunResult

    fake_stage("sft", lambda recipe, options: RunResult("sft", "completed", None, metrics={"corr": math.nan, "ok": 1.5}))
    result = rlhf("sft", str(sft_file), "--json")
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))["metrics"] == {
        "corr": None, "ok": 1.5}
