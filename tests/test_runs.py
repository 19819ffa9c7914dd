"""Run directories: atomic writes, one owner at a time, refusing / replacing / resuming runs, and resolving run chains."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlhf_cli import runs
from rlhf_cli.errors import DataError, RecipeError
from rlhf_cli.runs import (
    atomic_write_json,
    atomic_write_text,
    latest_checkpoint,
    prepare_run,
    read_manifest,
    resolve_model,
)

RECIPE_YAML = "stage: sft\nmodel: {path: m}\n"
RECIPE_JSON = {"stage": "sft", "model": {"path": "m"}}


def tree(root: Path) -> dict[str, str | None]:
    """Every path under root with its content's hash (None for directories), to show nothing changed."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else None
            for p in sorted(root.rglob("*"))}


def start(path: Path, stage: str = "sft", **kwargs) -> runs.RunDir:
    return prepare_run(path, stage, RECIPE_YAML, RECIPE_JSON, **kwargs)


def checkpoint(run_dir: Path, step: int, complete: bool = True) -> Path:
    path = run_dir / "checkpoints" / f"checkpoint-{step}"
    path.mkdir(parents=True)
    if complete:
        (path / "COMPLETE").touch()
    return path


def interrupted_run(path: Path) -> runs.RunDir:
    run = start(path)
    run.finish("interrupted")
    return run


@pytest.fixture
def interrupted(tmp_path) -> Path:
    """tmp_path/run, left interrupted by an earlier run."""
    path = tmp_path / "run"
    interrupted_run(path)
    return path


# --------------------------------------------------------------------------- atomic writes


def test_atomic_write_json_leaves_only_the_target(tmp_path):
    target = tmp_path / "run.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2})
    assert json.loads(target.read_text()) == {"a": 2}
    assert os.listdir(tmp_path) == ["run.json"]


def test_atomic_write_json_creates_parent_directories(tmp_path):
    target = tmp_path / "a" / "b" / "run.json"
    atomic_write_json(target, {"ok": True})
    assert json.loads(target.read_text()) == {"ok": True}


def test_a_write_refused_by_the_disk_names_the_target_not_its_temp_file(tmp_path, monkeypatch):
    # A read-only or full directory refuses the temp file first; its random name means nothing to the user.
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path / ".recipe.yaml.x1y2.tmp"))

    monkeypatch.setattr(runs.tempfile, "mkstemp", refuse)
    with pytest.raises(OSError) as e:
        atomic_write_text(tmp_path / "recipe.yaml", "stage: sft\n")
    assert (e.value.errno, e.value.filename) == (errno.EROFS, str(tmp_path / "recipe.yaml"))


@pytest.mark.parametrize("breaks", ["json.dumps", "os.fsync", "os.replace"])
def test_failed_write_keeps_the_old_content_and_no_temp_file(tmp_path, monkeypatch, breaks):
    target = tmp_path / "run.json"
    atomic_write_json(target, {"version": "old"})

    def boom(*args, **kwargs):
        raise OSError(f"{breaks} failed")

    module, name = breaks.split(".")
    monkeypatch.setattr(getattr(runs, module), name, boom)
    with pytest.raises(OSError, match="failed"):
        atomic_write_json(target, {"version": "new"})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"version": "old"}
    assert os.listdir(tmp_path) == ["run.json"]


def test_interrupt_mid_write_removes_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "recipe.yaml"
    atomic_write_text(target, "old\n")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(target, "new\n")
    monkeypatch.undo()
    assert target.read_text() == "old\n"
    assert os.listdir(tmp_path) == ["recipe.yaml"]


# --------------------------------------------------------------------------- manifest


def test_manifest_fields(tmp_path):
    run = start(tmp_path / "run", base_model={"path": "some/model"}, parent_run="runs/pretrain")
    manifest = read_manifest(tmp_path / "run")
    for key in ("schema_version", "stage", "status", "started_at", "versions", "command", "recipe"):
        assert key in manifest, key
    assert manifest["schema_version"] == runs.SCHEMA_VERSION
    assert (manifest["stage"], manifest["status"]) == ("sft", "running")
    assert manifest["recipe"] == RECIPE_JSON
    assert manifest["base_model"] == {"path": "some/model"}
    assert manifest["parent_run"] == str(Path("runs/pretrain").resolve())
    assert isinstance(manifest["versions"], dict)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == RECIPE_YAML

    run.finish("completed", metrics={"loss": 0.5})
    manifest = read_manifest(tmp_path / "run")
    assert manifest["status"] == "completed"
    assert manifest["metrics"] == {"loss": 0.5}
    assert manifest["finished_at"] >= manifest["started_at"]


def test_invalid_manifest_is_a_data_error_with_line(tmp_path):
    (tmp_path / "run.json").write_text('{\n  "stage": "sft",\n  oops\n}\n')
    with pytest.raises(DataError, match=r"run.json:3: run.json is not valid JSON"):
        read_manifest(tmp_path)


def test_only_rank_0_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    run = start(tmp_path / "run")
    run.finish("completed")
    run.log_metrics({"step": 1})
    assert not (tmp_path / "run" / "run.json").exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert not (tmp_path / "run" / ".lock").exists()  # rank 0 alone holds the run


# --------------------------------------------------------------------------- claiming an output directory


def test_completed_run_is_refused_without_overwrite(tmp_path):
    start(tmp_path / "run").finish("completed")
    with pytest.raises(RecipeError, match="completed sft run: pass --overwrite"):
        start(tmp_path / "run")
    assert read_manifest(tmp_path / "run")["status"] == "completed"


def test_overwrite_replaces_a_completed_run(tmp_path):
    path = tmp_path / "run"
    start(path).finish("completed")
    (path / "adapter").mkdir()
    (path / "adapter" / "weights.bin").write_bytes(b"old")
    run = start(path, overwrite=True)
    assert run.resume_from is None
    assert read_manifest(path)["status"] == "running"
    assert not (path / "adapter").exists()


def _completed_with_files(path: Path) -> dict[str, str | None]:
    start(path).finish("completed", metrics={"loss": 1.0})
    (path / "adapter").mkdir()
    (path / "adapter" / "weights.bin").write_bytes(b"old")
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    return _content(path)


def _content(path: Path) -> dict[str, str | None]:
    return {k: v for k, v in tree(path).items() if k != ".lock"}


def test_a_failing_overwrite_puts_the_completed_run_back(tmp_path):
    """--overwrite keeps the completed run aside until its replacement completes: when that one fails, the
    directory is again exactly the run that was there."""
    path = tmp_path / "run"
    before = _completed_with_files(path)
    run = start(path, overwrite=True)
    assert not (path / "adapter").exists() and (path / ".replaced" / "adapter" / "weights.bin").read_bytes() == b"old"
    (path / "checkpoints").mkdir()
    run.log_metrics({"step": 1, "loss": float("nan")})
    run.finish("failed", error="loss is nan at step 1")
    assert _content(path) == before
    run.update(peak_memory_gb=1.0)  # a late write of the failed run does not land on the one put back
    assert _content(path) == before


def test_an_overwrite_failing_on_a_full_disk_still_puts_the_completed_run_back(tmp_path, monkeypatch):
    """The disk filled up during training: run.json of the failed run cannot be written, and need not be, as
    the completed run comes back with its own."""
    path = tmp_path / "run"
    before = _completed_with_files(path)
    run = start(path, overwrite=True)
    (path / "checkpoints").mkdir()

    def disk_full(target: Path, text: str) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(runs, "atomic_write_text", disk_full)
    run.finish("failed", error="OSError: [Errno 28] No space left on device")
    assert _content(path) == before


def test_an_overwrite_that_completes_drops_the_run_it_replaced(tmp_path):
    path = tmp_path / "run"
    _completed_with_files(path)
    start(path, overwrite=True).finish("completed")
    assert sorted(os.listdir(path)) == [".lock", "recipe.yaml", "run.json"]


def test_the_replaced_run_waits_through_an_interruption_of_its_replacement(tmp_path):
    """Interrupted, the new run stays resumable and the completed one stays aside; the new run started over
    and failed, it is the completed one that comes back."""
    path = tmp_path / "run"
    before = _completed_with_files(path)
    start(path, overwrite=True).finish("interrupted")
    assert (path / ".replaced" / "run.json").is_file()
    again = start(path, resume="never")
    assert (path / ".replaced" / "adapter").is_dir()
    again.finish("failed", error="x")
    assert _content(path) == before


@pytest.mark.parametrize("failing", ["run.json", "recipe.yaml"])
def test_an_overwrite_whose_claim_cannot_write_puts_the_completed_run_back(tmp_path, monkeypatch, failing):
    """A full disk while the claim writes the new run's files: the completed run it had set aside is back in
    place, not left in .replaced/ under its own run.json for the next --overwrite to delete."""
    path = tmp_path / "run"
    before = _completed_with_files(path)
    write = runs.atomic_write_text

    def disk_full(target: Path, text: str) -> None:
        if target.name == failing:
            raise OSError(errno.ENOSPC, "No space left on device", str(target))
        write(target, text)

    monkeypatch.setattr(runs, "atomic_write_text", disk_full)
    with pytest.raises(OSError, match="No space left"):
        start(path, overwrite=True)
    assert _content(path) == before
    monkeypatch.setattr(runs, "atomic_write_text", write)
    start(path, overwrite=True).finish("failed", error="x")  # the retry failing too still keeps it
    assert _content(path) == before


def test_a_claim_killed_while_setting_a_run_aside_is_undone_by_the_next(tmp_path):
    path = tmp_path / "run"
    before = _completed_with_files(path)
    torn = path / ".replaced.tmp"
    torn.mkdir()
    os.replace(path / "adapter", torn / "adapter")  # killed after the first move
    with pytest.raises(RecipeError, match="completed sft run"):
        start(path)
    assert _content(path) == before


def test_a_resumed_run_drops_what_the_stopped_session_said_of_its_end(tmp_path):
    path = tmp_path / "run"
    start(path).finish("failed", error="ValueError: disk full", checkpoint=str(checkpoint(path, 2)))
    run = start(path)
    assert run.resume_from is not None
    assert "error" not in read_manifest(path) and "checkpoint" not in read_manifest(path)


def test_run_of_another_stage_is_refused(tmp_path):
    start(tmp_path / "run", stage="train-rm").finish("completed")
    with pytest.raises(RecipeError, match="holds a `train-rm` run, not `sft`"):
        start(tmp_path / "run")


def users_files(root: Path) -> dict[str, str | None]:
    (root / "notes.txt").write_text("mine")
    (root / "data").mkdir()
    (root / "data" / "chat.jsonl").write_text('{"prompt": "hi"}\n')
    return tree(root)


@pytest.mark.parametrize("overwrite", [False, True])
def test_non_run_directory_with_files_is_refused_even_with_overwrite(tmp_path, overwrite):
    before = users_files(tmp_path)
    with pytest.raises(RecipeError) as e:
        start(tmp_path, overwrite=overwrite)
    assert e.value.exit_code == 2
    assert e.value.message == f"{tmp_path} is not empty and holds no run (no run.json): choose a new or empty --output-dir"
    assert tree(tmp_path) == before


def test_parent_run_as_output_dir_is_refused(tmp_path):
    start(tmp_path / "run").finish("completed")
    before = tree(tmp_path)
    with pytest.raises(RecipeError, match=r"run is the run this sft run starts from: choose another --output-dir$"):
        start(tmp_path / "run", overwrite=True, parent_run=str(tmp_path / "run"))
    assert tree(tmp_path) == before


def _sft_and_rm(tmp_path: Path) -> tuple[Path, Path]:
    """A completed sft run (full model) and a reward run trained from it, as ppo takes them."""
    sft = fake_run(tmp_path / "sft", "sft", {"kind": "full", "path": "model", "tokenizer": "tokenizer"})
    rm = fake_run(tmp_path / "rm", "train-rm", {"kind": "reward-adapter", "adapters": ["adapter"], "tokenizer": "tokenizer"},
                  base_model={"path": str(sft)})
    return sft, rm


@pytest.mark.parametrize("resume", ["auto", "never"])
def test_reward_run_as_ppo_output_dir_is_refused_even_with_overwrite(tmp_path, resume):
    sft, rm = _sft_and_rm(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(RecipeError) as e:
        start(rm, "ppo", overwrite=True, resume=resume, parent_run=str(sft),
              inputs=[resolve_model(str(sft)), resolve_model(str(rm))])
    assert e.value.exit_code == 2
    assert e.value.message == f"{rm} is an input of this ppo run: choose another --output-dir"
    assert tree(tmp_path) == before


def test_a_run_that_an_input_was_trained_from_is_refused_as_output_dir(tmp_path):
    # ppo --policy runs/dpo -o runs/sft --overwrite: runs/dpo's base is runs/sft's model.
    sft, _ = _sft_and_rm(tmp_path)
    dpo = fake_run(tmp_path / "dpo", "dpo", {"kind": "adapter", "adapters": ["adapter"]}, base_model={"path": str(sft)})
    before = tree(tmp_path)
    with pytest.raises(RecipeError) as e:
        start(sft, "ppo", overwrite=True, parent_run=str(dpo), inputs=[resolve_model(str(dpo))])
    assert e.value.message == f"{sft} holds {sft / 'model'}, an input of this ppo run: choose another --output-dir"
    assert tree(tmp_path) == before


def test_empty_existing_directory_is_used(tmp_path):
    start(tmp_path)
    assert read_manifest(tmp_path)["status"] == "running"


def test_a_directory_left_by_a_claim_killed_while_writing_its_first_run_json_is_claimed_again(tmp_path):
    """A claim killed mid-write leaves its lock and run.json's temp file: nothing of the user's, so the next
    claim goes ahead rather than refusing the directory as someone else's, --overwrite or not."""
    path = tmp_path / "run"
    path.mkdir()
    (path / ".lock").write_text("")
    (path / ".run.json.k2j3h4.tmp").write_text('{"schema_ver')
    assert read_manifest(start(path).path)["status"] == "running"
    (path / "notes.txt").write_text("mine")
    (path / "run.json").unlink()
    with pytest.raises(RecipeError, match="holds no run"):
        start(path)




# --------------------------------------------------------------------------- one owner at a time


HOLDER = """
import sys, time
from rlhf_cli.runs import prepare_run
run = prepare_run(sys.argv[1], "sft", "stage: sft\\n", {"stage": "sft", "model": {"path": "m"}})
ckpt = run.checkpoints / "checkpoint-2"
ckpt.mkdir(parents=True)
(ckpt / "COMPLETE").touch()
print("claimed", flush=True)
time.sleep(120)
"""


def written_run(path: Path, status: str, stage: str = "sft") -> None:
    """A run directory as another process (or an older version, without a lock file) left it."""
    atomic_write_json(path / "run.json", {"schema_version": 1, "stage": stage, "status": status, "recipe": RECIPE_JSON})
    atomic_write_text(path / "recipe.yaml", RECIPE_YAML)


@contextlib.contextmanager
def held_by_another_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path, Path]]:
    """(the process, its script, the run directory): a process that has claimed tmp_path/run (HOLDER) and
    sleeps in it; killed with SIGKILL when the block ends."""
    script = tmp_path / "holder.py"
    script.write_text(HOLDER)
    path = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    holder = subprocess.Popen([sys.executable, str(script), str(path)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "claimed\n"
        yield holder, script, path
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()


def test_a_second_claim_is_refused_naming_the_holder_until_it_is_killed(tmp_path):
    with held_by_another_process(tmp_path) as (holder, script, path):
        before = tree(path)
        for overwrite in (False, True):
            with pytest.raises(RecipeError) as e:
                start(path, overwrite=overwrite)
            assert e.value.exit_code == 2
            assert e.value.message == (
                f"{path} is in use by another process (pid {holder.pid} on {socket.gethostname()}: {script} {path}): "
                "wait for it to finish, or choose another --output-dir"
            )
            assert tree(path) == before
    # Killed mid-run: run.json still says running, but nobody holds it, so it is an interrupted run.
    assert read_manifest(path)["status"] == "running"
    run = start(path)
    assert run.resume_from == path / "checkpoints" / "checkpoint-2"


def test_a_run_still_training_given_as_a_model_says_to_wait_not_to_resume(tmp_path):
    with held_by_another_process(tmp_path) as (holder, script, path):
        with pytest.raises(DataError) as e:
            resolve_model(str(path))
        assert e.value.message == (f"{path}: run is still training (pid {holder.pid} on {socket.gethostname()}: "
                                   f"{script} {path}): wait for it to finish, or give a completed run")
    # Killed: nobody trains it any more, so it is to be resumed.
    with pytest.raises(DataError, match="run is running, not completed; finish it with --resume auto first"):
        resolve_model(str(path))


def test_a_lock_held_through_another_open_file_refuses_the_claim(tmp_path):
    written_run(tmp_path, "interrupted")
    checkpoint(tmp_path, 3)
    with open(tmp_path / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        before = tree(tmp_path)
        with pytest.raises(RecipeError, match=r"is in use by another process \(it has not recorded itself yet\)"):
            start(tmp_path)
        assert tree(tmp_path) == before
    assert start(tmp_path).resume_from == tmp_path / "checkpoints" / "checkpoint-3"


@pytest.mark.parametrize("lock_file", ["none", "left by the last holder"])
@pytest.mark.parametrize("status", ["completed", "interrupted"])
def test_a_claim_refused_under_the_lock_leaves_the_directory_as_it_was(tmp_path, status, lock_file):
    written_run(tmp_path, status)
    checkpoint(tmp_path, 1)
    if lock_file != "none":
        (tmp_path / ".lock").write_text('{"pid": 1, "host": "h", "command": "rlhf sft", "since": "then"}\n')
    before = tree(tmp_path)
    with pytest.raises(RecipeError, match="holds a completed sft run" if status == "completed" else "the recipe changed"):
        prepare_run(tmp_path, "sft", RECIPE_YAML, {**RECIPE_JSON, "seed": 1})
    assert tree(tmp_path) == before  # no new .lock, nor a rewritten one


def test_the_lock_file_is_not_content_and_survives_overwrite(tmp_path):
    (tmp_path / ".lock").write_text("")  # left by a claim that died before writing run.json
    start(tmp_path).finish("completed")
    (tmp_path / "adapter").mkdir()
    start(tmp_path, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == [".lock", ".replaced", "recipe.yaml", "run.json"]
    with open(tmp_path / ".lock") as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)  # still held by this process


# --------------------------------------------------------------------------- resuming


def test_resume_auto_picks_the_newest_complete_checkpoint(tmp_path):
    path = tmp_path / "run"
    old = interrupted_run(path)
    checkpoint(path, 2)
    five = checkpoint(path, 5)
    checkpoint(path, 7, complete=False)  # a crash mid-save leaves no marker
    checkpoint(path, 10).joinpath("COMPLETE").unlink()
    run = start(path)
    assert run.resume_from == five
    manifest = read_manifest(path)
    assert manifest["resumed_from"] == str(five)
    assert manifest["started_at"] == old.manifest["started_at"]
    assert manifest["status"] == "running"
    assert (path / "checkpoints" / "checkpoint-2").is_dir()


def test_latest_checkpoint_orders_by_step_not_by_name(tmp_path):
    checkpoint(tmp_path, 9)
    checkpoint(tmp_path, 10)
    (tmp_path / "checkpoints" / "checkpoint-x").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_interrupted_run_without_checkpoint_starts_over(interrupted):
    path = interrupted
    (path / "metrics.jsonl").write_text('{"step": 1}\n')
    run = start(path)
    assert run.resume_from is None
    assert not (path / "metrics.jsonl").exists()


def test_resume_never_starts_over(interrupted):
    path = interrupted
    checkpoint(path, 5)
    run = start(path, resume="never")
    assert run.resume_from is None
    assert not (path / "checkpoints").exists()


def test_resume_from_a_given_checkpoint(interrupted):
    path = interrupted
    checkpoint(path, 5)
    three = checkpoint(path, 3)
    run = start(path, resume=str(three))
    assert run.resume_from == three
    # checkpoint-5 was the continuation this run replaces: gone, so --resume auto cannot pick it later.
    assert sorted(os.listdir(path / "checkpoints")) == ["checkpoint-3"]
    assert read_manifest(path)["resumed_from"] == str(three)


@pytest.mark.parametrize(("resume", "hint"), [("autoo", "did you mean --resume auto?"), ("nevr", "did you mean --resume never?"),
                                             ("ckpt-3", "or --resume auto | never")])
def test_a_mistyped_resume_mode_is_named_with_the_modes(tmp_path, monkeypatch, resume, hint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError) as e:
        start(tmp_path / "run", resume=resume)
    assert e.value.message == f"--resume {resume}: checkpoint directory not found ({hint})"
    assert not (tmp_path / "run").exists()


def test_resume_from_a_missing_or_odd_path_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="checkpoint directory not found"):
        start(tmp_path / "run", resume=str(tmp_path / "checkpoint-3"))
    (tmp_path / "somewhere").mkdir()
    with pytest.raises(DataError, match="not a checkpoint directory"):
        start(tmp_path / "run", resume=str(tmp_path / "somewhere"))


def refused(root: Path, claim) -> str:
    """The message of the RecipeError (exit 2) with which claim() refuses, having changed nothing under root."""
    before = tree(root)
    with pytest.raises(RecipeError) as e:
        claim()
    assert e.value.exit_code == 2
    assert tree(root) == before
    return e.value.message


def refused_resume(tmp_path: Path, resume: Path, overwrite: bool = False) -> str:
    """The message with which start(tmp_path/run, resume=...) refuses."""
    return refused(tmp_path, lambda: start(tmp_path / "run", resume=str(resume), overwrite=overwrite))


def completed_run_with_checkpoint(path: Path, stage: str = "sft") -> Path:
    start(path, stage=stage).finish("completed")
    return checkpoint(path, 4)


def test_resume_path_on_a_completed_run_is_refused(tmp_path):
    four = completed_run_with_checkpoint(tmp_path / "run")
    assert refused_resume(tmp_path, four) == (
        f"{tmp_path / 'run'} holds a completed sft run: pass --overwrite to replace it, or choose another --output-dir")


def test_resume_path_with_overwrite_continues_a_completed_run(tmp_path):
    four = completed_run_with_checkpoint(tmp_path / "run")
    run = start(tmp_path / "run", resume=str(four), overwrite=True)
    assert run.resume_from == four and four.is_dir()
    assert read_manifest(tmp_path / "run")["status"] == "running"


@pytest.mark.parametrize("overwrite", [False, True])
def test_resume_path_on_a_run_of_another_stage_is_refused(tmp_path, overwrite):
    four = completed_run_with_checkpoint(tmp_path / "run", stage="train-rm")
    assert refused_resume(tmp_path, four, overwrite=overwrite) == (
        f"--resume {four}: {tmp_path / 'run'} holds a `train-rm` run, not `sft`: "
        "its checkpoints do not continue a sft run; choose another --output-dir")


def test_resume_path_to_an_incomplete_checkpoint_is_refused(tmp_path):
    interrupted_run(tmp_path / "run")
    torn = checkpoint(tmp_path / "run", 6, complete=False)
    (torn / "optimizer.pt").write_bytes(b"\x80\x02")  # cut short mid-save
    assert refused_resume(tmp_path, torn) == (
        f"--resume {torn}: incomplete checkpoint (no COMPLETE marker: its save was cut short): "
        "resume from another checkpoint, or --resume auto for the newest complete one")


def test_resume_path_of_another_run_directory_is_refused(tmp_path):
    interrupted_run(tmp_path / "other")
    theirs = checkpoint(tmp_path / "other", 3)
    interrupted_run(tmp_path / "run")
    before = tree(tmp_path)
    with pytest.raises(RecipeError, match=r"not a checkpoint of .*run \(expected .*run/checkpoints/checkpoint-N\): "
                                          r"to continue the run it belongs to, pass that run's directory as --output-dir"):
        start(tmp_path / "run", resume=str(theirs))
    assert tree(tmp_path) == before
    # The same checkpoint through another spelling of the path is this run's.
    assert start(tmp_path / "other", resume=str(tmp_path / "run" / ".." / "other" / "checkpoints" / "checkpoint-3")).resume_from


SFT_JSON = {"stage": "sft", "model": {"path": "m", "dtype": "auto"}, "lora": {"r": 16, "alpha": 32},
            "data": {"train": "chat.jsonl", "fields": {}}, "output_dir": "runs/sft",
            "train": {"lr": 2e-4, "max_steps": 10, "logging_steps": 10, "report_to": []}}


def with_keys(recipe: dict, **dotted) -> dict:
    out = json.loads(json.dumps(recipe))
    for key, value in dotted.items():
        *parents, last = key.split("__")
        node = out
        for name in parents:
            node = node[name]
        node[last] = value
    return out


def interrupted_sft(path: Path) -> Path:
    prepare_run(path, "sft", RECIPE_YAML, SFT_JSON).finish("interrupted")
    return checkpoint(path, 5)


@pytest.mark.parametrize("how", ["auto", "path"])
def test_resume_with_a_changed_recipe_is_refused(tmp_path, how):
    five = interrupted_sft(tmp_path / "run")
    changed = with_keys(SFT_JSON, train__lr=1e-3, lora__r=8, data__fields={"q": "prompt"}, train__max_steps=20)
    before = tree(tmp_path)
    with pytest.raises(RecipeError) as e:
        prepare_run(tmp_path / "run", "sft", RECIPE_YAML, changed, resume="auto" if how == "auto" else str(five))
    assert e.value.message == (
        f"{tmp_path / 'run'}: the recipe changed since this run started (data.fields, lora.r, train.lr); "
        "resuming continues the same run: restore those keys, or start over with --resume never, --overwrite, "
        "or another --output-dir"
    )
    assert tree(tmp_path) == before


def test_resume_may_change_how_long_and_how_often(tmp_path):
    five = interrupted_sft(tmp_path / "run")
    longer = with_keys(SFT_JSON, train__max_steps=20, train__logging_steps=1, train__report_to=["tensorboard"],
                       output_dir=str(tmp_path / "run"))
    run = prepare_run(tmp_path / "run", "sft", RECIPE_YAML, longer)
    assert run.resume_from == five
    manifest = read_manifest(tmp_path / "run")
    assert manifest["recipe"]["train"]["max_steps"] == 20
    assert manifest["fingerprint"] == runs._fingerprint_id(SFT_JSON) != runs._fingerprint_id(with_keys(SFT_JSON, train__lr=1.0))


@pytest.mark.parametrize(("stage", "key"), [("sft", "train__max_steps"), ("ppo", "ppo__iterations"), ("grpo", "grpo__iterations")])
def test_resume_from_a_checkpoint_past_the_recipes_last_step_is_refused(tmp_path, stage, key):
    recipe = {**SFT_JSON, "stage": stage, "ppo": {"iterations": 10}, "grpo": {"iterations": 10}}
    prepare_run(tmp_path / "run", stage, RECIPE_YAML, recipe).finish("interrupted")
    checkpoint(tmp_path / "run", 5)
    before = tree(tmp_path)
    dotted = key.replace("__", ".")
    with pytest.raises(RecipeError) as e:
        prepare_run(tmp_path / "run", stage, RECIPE_YAML, with_keys(recipe, **{key: 3}))
    assert e.value.message == (
        f"{tmp_path / 'run'}: checkpoint-5 is at step 5, past {dotted}=3: to continue this run set {dotted} to 5 or more; "
        "to train a shorter one, start over with --resume never, --overwrite, or another --output-dir"
    )
    assert tree(tmp_path) == before
    # Ending exactly at the checkpoint resumes it (the run was stopped while finishing).
    assert prepare_run(tmp_path / "run", stage, RECIPE_YAML, with_keys(recipe, **{key: 5})).resume_from.name == "checkpoint-5"


def test_resume_past_the_recipes_epochs_is_refused_and_at_them_continues(tmp_path):
    by_epochs = with_keys(SFT_JSON, train__max_steps=None, train__epochs=3)
    prepare_run(tmp_path / "run", "sft", RECIPE_YAML, by_epochs).finish("interrupted")
    five = checkpoint(tmp_path / "run", 5)
    (five / "trainer_state.json").write_text(json.dumps({"global_step": 5, "epoch": 2.5}))
    with pytest.raises(RecipeError, match=r"checkpoint-5 has trained 2.50 epochs, past train.epochs=2: .* set train.epochs to 3 or more"):
        prepare_run(tmp_path / "run", "sft", RECIPE_YAML, with_keys(by_epochs, train__epochs=2))
    (five / "trainer_state.json").write_text(json.dumps({"global_step": 5, "epoch": 2.0}))
    assert prepare_run(tmp_path / "run", "sft", RECIPE_YAML, with_keys(by_epochs, train__epochs=2)).resume_from == five


def test_every_resumable_key_is_a_recipe_key():
    from pydantic import BaseModel

    from rlhf_cli.recipe import RECIPE_CLASSES

    def keys(model: type[BaseModel], prefix: str = "") -> set[str]:
        out = set()
        for name, info in model.model_fields.items():
            out.add(prefix + name)
            nested = [t for t in (info.annotation, *getattr(info.annotation, "__args__", ())) if isinstance(t, type)]
            for t in nested:
                if issubclass(t, BaseModel):
                    out |= keys(t, f"{prefix}{name}.")
        return out

    known = set().union(*(keys(cls) for cls in RECIPE_CLASSES.values()))
    assert runs.RESUMABLE_KEYS and runs.RESUMABLE_KEYS <= known, runs.RESUMABLE_KEYS - known


def test_truncate_metrics_drops_steps_after_the_checkpoint(tmp_path):
    run = start(tmp_path / "run")
    for step in range(1, 11):
        run.log_metrics({"step": step, "loss": 1.0 / step})
    run.truncate_metrics(5)
    steps = [json.loads(line)["step"] for line in run.metrics_file.read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]
    assert sorted(os.listdir(run.path)) == [".lock", "metrics.jsonl", "recipe.yaml", "run.json"]


def test_truncate_metrics_without_a_file_is_a_no_op(tmp_path):
    run = start(tmp_path / "run")
    run.truncate_metrics(5)
    assert not run.metrics_file.exists()


def test_truncate_metrics_drops_a_torn_last_line_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("rlhf"), "propagate", True)  # the CLI's logging setup may have turned it off
    run = start(tmp_path / "run")
    for step in range(1, 4):
        run.log_metrics({"step": step, "loss": 1.0})
    with run.metrics_file.open("a") as f:
        f.write('{"step": 4, "lo')  # the process died mid-write
    run.truncate_metrics(3)
    assert [json.loads(line)["step"] for line in run.metrics_file.read_text().splitlines()] == [1, 2, 3]
    assert f"{run.metrics_file}:4: dropping the torn last line" in caplog.text


@pytest.mark.parametrize("bad", [b'{"step": 2, "lo', b"[2]", b"\xff"])
def test_truncate_metrics_refuses_a_bad_line_before_the_last(tmp_path, bad):
    run = start(tmp_path / "run")
    run.metrics_file.write_bytes(b'{"step": 1}\n' + bad + b'\n{"step": 3}\n')
    before = tree(tmp_path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(run.metrics_file))}:2: not a (valid JSON line|JSON object): fix or delete"):
        run.truncate_metrics(3)
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------- resolving models


def fake_run(path: Path, stage: str, model: dict, base_model=None, status: str = "completed", **extra) -> Path:
    """A run directory holding the (empty) files its run.json names."""
    path.mkdir(parents=True)
    files = {model.get("path"): ["config.json"], model.get("tokenizer"): [],
             **{a: ["adapter_config.json", "adapter_model.safetensors"] for a in model.get("adapters", [])}}
    for sub, names in files.items():
        if sub:
            (path / sub).mkdir()
            for name in names:
                (path / sub / name).write_text("{}")
    manifest = {"schema_version": 1, "stage": stage, "status": status, "model": model, "base_model": base_model, **extra}
    (path / "run.json").write_text(json.dumps(manifest))
    return path


def test_resolve_chain_of_runs(tmp_path):
    pretrain = fake_run(tmp_path / "pretrain", "pretrain", {"kind": "full", "path": "model", "tokenizer": "tokenizer"})
    sft = fake_run(
        tmp_path / "sft", "sft", {"kind": "adapter", "adapters": ["adapter"], "tokenizer": "tokenizer"},
        base_model={"path": str(pretrain)},
    )
    ppo = fake_run(tmp_path / "ppo", "ppo", {"kind": "adapter", "adapters": ["adapter"]}, base_model=str(sft))

    resolved = resolve_model(str(ppo))
    assert resolved.base == str(pretrain / "model")
    assert resolved.adapters == (str(sft / "adapter"), str(ppo / "adapter"))
    assert resolved.tokenizer_path == str(sft / "tokenizer")  # the nearest run that saved one
    assert resolved.kind == "causal-lm"
    assert resolved.run_dir == str(ppo)


def test_resolve_reward_run(tmp_path):
    rm = fake_run(
        tmp_path / "rm", "train-rm", {"kind": "reward-adapter", "adapters": ["adapter"], "tokenizer": "tokenizer"},
        base_model={"path": "org/base-model"},
    )
    resolved = resolve_model(str(rm))
    assert (resolved.base, resolved.kind) == ("org/base-model", "reward")
    assert resolved.adapters == (str(rm / "adapter"),)


def test_resolve_hub_id_and_model_directory(tmp_path):
    assert resolve_model("org/model").base == "org/model"
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)).adapters == ()


def test_resolve_directory_that_is_neither_run_nor_model(tmp_path):
    with pytest.raises(DataError, match="neither a run directory"):
        resolve_model(str(tmp_path))


@pytest.mark.parametrize("status", ["running", "interrupted", "failed"])
def test_resolve_unfinished_run_is_a_data_error(tmp_path, status):
    run = fake_run(tmp_path / "sft", "sft", {"kind": "adapter", "adapters": ["adapter"]}, "org/base", status=status)
    with pytest.raises(DataError, match=f"run is {status}, not completed"):
        resolve_model(str(run))


def test_resolve_chain_with_an_unfinished_parent_is_a_data_error(tmp_path):
    sft = fake_run(tmp_path / "sft", "sft", {"kind": "adapter", "adapters": ["adapter"]}, "org/base", status="interrupted")
    ppo = fake_run(tmp_path / "ppo", "ppo", {"kind": "adapter", "adapters": ["adapter"]}, base_model=str(sft))
    with pytest.raises(DataError, match="sft: run is interrupted"):
        resolve_model(str(ppo))


def test_a_run_json_cannot_switch_remote_code_on(tmp_path):
    untrusted = {"trust_remote_code": True, "recipe": {"model": {"path": "org/base", "trust_remote_code": True}}}
    sft = fake_run(tmp_path / "sft", "sft", {"kind": "adapter", "adapters": ["adapter"]}, "org/base", **untrusted)
    ppo = fake_run(tmp_path / "ppo", "ppo", {"kind": "adapter", "adapters": ["adapter"]}, str(sft), **untrusted)
    assert resolve_model(str(ppo)).trust_remote_code is False
    assert resolve_model(str(ppo), trust_remote_code=True).trust_remote_code is True


# --------------------------------------------------------------------------- inputs trained again


def _retrain(run: Path) -> None:
    """What `--overwrite` does to a run's identity: the folder holds another run, with another run_id."""
    manifest = json.loads((run / "run.json").read_text())
    (run / "run.json").write_text(json.dumps({**manifest, "run_id": "trained-again", "finished_at": "2026-12-02T10:00:00+00:00"}))


def test_a_run_records_the_id_of_each_run_it_reads(tmp_path):
    sft, rm = _sft_and_rm(tmp_path)
    for run, run_id in ((sft, "sft-1"), (rm, "rm-1")):
        manifest = json.loads((run / "run.json").read_text())
        (run / "run.json").write_text(json.dumps({**manifest, "run_id": run_id}))
    start(tmp_path / "ppo", "ppo", parent_run=str(sft), inputs=[resolve_model(str(sft)), resolve_model(str(rm))])
    first = read_manifest(tmp_path / "ppo")
    assert first["inputs"] == {str(sft.resolve()): "sft-1", str(rm.resolve()): "rm-1"}
    start(tmp_path / "ppo", "ppo", overwrite=True, parent_run=str(sft), inputs=[resolve_model(str(sft))])
    again = read_manifest(tmp_path / "ppo")
    assert len(again["run_id"]) == 32 and again["run_id"] != first["run_id"]
    assert runs.changed_inputs(again) == []
    _retrain(sft)
    (rm / "run.json").unlink()
    assert runs.changed_inputs(first) == [
        f"{sft.resolve()} was trained again (finished 2026-12-02T10:00:00+00:00)", f"{rm.resolve()} is gone",
    ]


def _sft_and_ppo(tmp_path: Path) -> tuple[Path, Path]:
    sft = fake_run(tmp_path / "sft", "sft", {"kind": "adapter", "adapters": ["adapter"], "tokenizer": "tokenizer"},
                   base_model={"path": "org/base"}, run_id="sft-1")
    ppo = fake_run(tmp_path / "ppo", "ppo", {"kind": "adapter", "adapters": ["adapter"]}, base_model={"path": str(sft)},
                   run_id="ppo-1", inputs={str(sft.resolve()): "sft-1"})
    return sft, ppo


def test_an_adapter_over_a_parent_trained_again_since_is_refused(tmp_path):
    # The ppo adapter was trained on the sft adapter it recorded; stacked on another one it is a model nobody trained.
    sft, ppo = _sft_and_ppo(tmp_path)
    assert resolve_model(str(ppo)).adapters == (str(sft / "adapter"), str(ppo / "adapter"))
    _retrain(sft)
    with pytest.raises(DataError) as e:
        resolve_model(str(ppo))
    assert e.value.exit_code == 3
    assert e.value.message == (
        f"{ppo}: trained on top of {sft}, which was trained again since: its adapter no longer fits the model "
        f"beneath it; train {ppo} again, or give another run"
    )
    assert resolve_model(str(sft)).adapters == (str(sft / "adapter"),)  # the parent itself is fine


def test_resume_after_an_input_was_trained_again_is_refused(tmp_path):
    sft, _ = _sft_and_ppo(tmp_path)
    inputs = [resolve_model(str(sft))]
    start(tmp_path / "run", "ppo", parent_run=str(sft), inputs=inputs).finish("interrupted")
    five = checkpoint(tmp_path / "run", 5)
    _retrain(sft)
    for resume in ("auto", str(five)):
        message = refused(tmp_path, lambda resume=resume: start(tmp_path / "run", "ppo", parent_run=str(sft),
                                                                 inputs=[resolve_model(str(sft))], resume=resume))
        assert message == (
            f"{tmp_path / 'run'}: since this run started, {sft.resolve()} was trained again (finished "
            "2026-12-02T10:00:00+00:00); its checkpoints were trained against the earlier weights: start over with "
            "--resume never, --overwrite, or another --output-dir"
        )
    # Starting over is allowed, and records the input as it is now.
    run = start(tmp_path / "run", "ppo", parent_run=str(sft), inputs=[resolve_model(str(sft))], resume="never")
    assert run.resume_from is None and read_manifest(tmp_path / "run")["inputs"] == {str(sft.resolve()): "trained-again"}


@pytest.mark.parametrize("how", ["auto", "path"])
def test_resume_on_changed_data_is_refused(tmp_path, how):
    prepare_run(tmp_path / "run", "sft", RECIPE_YAML, SFT_JSON, data_fingerprint="records-1").finish("interrupted")
    five = checkpoint(tmp_path / "run", 5)
    assert read_manifest(tmp_path / "run")["data_fingerprint"] == "records-1"
    message = refused(tmp_path, lambda: prepare_run(tmp_path / "run", "sft", RECIPE_YAML, SFT_JSON,
                                                    data_fingerprint="records-2", resume="auto" if how == "auto" else str(five)))
    assert message == (
        f"{tmp_path / 'run'}: the data changed since this run started (the records read from the recipe's data "
        "files differ); its checkpoints were trained on the earlier records: restore those files, or start over "
        "with --resume never, --overwrite, or another --output-dir"
    )
    assert prepare_run(tmp_path / "run", "sft", RECIPE_YAML, SFT_JSON, data_fingerprint="records-1").resume_from == five


def test_a_run_from_before_data_fingerprints_resumes(tmp_path):
    prepare_run(tmp_path / "run", "sft", RECIPE_YAML, SFT_JSON).finish("interrupted")
    five = checkpoint(tmp_path / "run", 5)
    assert prepare_run(tmp_path / "run", "sft", RECIPE_YAML, SFT_JSON, data_fingerprint="records-1").resume_from == five


def test_the_data_fingerprint_follows_the_records_and_where_they_are():
    from rlhf_cli.core.data import fingerprint

    a, b = {"prompt": "hi", "completion": "hello"}, {"prompt": "bye", "completion": "ciao"}
    assert fingerprint([a, b], []) == fingerprint([dict(reversed(list(a.items()))), b], [])  # key order is not content
    ids = {fingerprint([a, b], []), fingerprint([b, a], []), fingerprint([a], [b]), fingerprint([a], []),
           fingerprint([a, {**b, "completion": "ciao!"}], [])}
    assert len(ids) == 5


def test_resume_with_its_inputs_unchanged_continues(tmp_path):
    sft, _ = _sft_and_ppo(tmp_path)
    start(tmp_path / "run", "ppo", parent_run=str(sft), inputs=[resolve_model(str(sft))]).finish("interrupted")
    five = checkpoint(tmp_path / "run", 5)
    assert start(tmp_path / "run", "ppo", parent_run=str(sft), inputs=[resolve_model(str(sft))]).resume_from == five


@pytest.mark.parametrize("deleted", ["adapter_config.json", "adapter_model.safetensors"])
def test_run_with_deleted_adapter_files_is_a_data_error(tmp_path, deleted):
    sft = fake_run(tmp_path / "sft", "sft", {"kind": "adapter", "adapters": ["adapter"]}, "org/base")
    (sft / "adapter" / deleted).unlink()
    before = tree(tmp_path)
    with pytest.raises(DataError) as e:
        resolve_model(str(sft))
    assert e.value.message == f"{sft / 'adapter' / deleted}: missing, though {sft / 'run.json'} names it: restore it, or train that run again"
    assert tree(tmp_path) == before


def test_full_run_with_deleted_model_is_a_data_error(tmp_path):
    full = fake_run(tmp_path / "full", "sft", {"kind": "full", "path": "model"}, "org/base")
    (full / "model" / "config.json").unlink()
    with pytest.raises(DataError, match=r"model/config.json: missing, though .*run.json names it"):
        resolve_model(str(full))


# --------------------------------------------------------------------------- through the CLI


def test_cli_overwrite_of_the_working_directory_deletes_nothing(tmp_path, monkeypatch):
    """`rlhf sft recipe.yaml -o . --overwrite` in a directory of the user's own files: exit 2, nothing touched."""
    from typer.testing import CliRunner

    from rlhf_cli.cli import app

    def claim_only(recipe, options):
        prepare_run(recipe.output_dir, "sft", RECIPE_YAML, recipe.model_dump(mode="json"),
                    resume=options.resume, overwrite=options.overwrite)
        raise AssertionError("the directory was claimed")

    stage = types.ModuleType("rlhf_cli.stages.sft")
    stage.run = claim_only
    monkeypatch.setitem(sys.modules, "rlhf_cli.stages.sft", stage)
    monkeypatch.chdir(tmp_path)
    users_files(tmp_path)
    (tmp_path / "sft.yaml").write_text("stage: sft\nmodel: {path: m}\ndata: {train: data/chat.jsonl}\n")
    before = tree(tmp_path)
    result = CliRunner().invoke(app, ["sft", "sft.yaml", "-o", ".", "--overwrite"])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == [
        "error: . is not empty and holds no run (no run.json): choose a new or empty --output-dir"
    ]
    assert tree(tmp_path) == before


# --------------------------------------------------------------------------- checkpoints damaged after their save


def saved_checkpoint(run_dir: Path, step: int) -> Path:
    """A checkpoint as a trainer leaves it: its files, then COMPLETE listing their sizes."""
    path = checkpoint(run_dir, step, complete=False)
    (path / "optimizer.pt").write_bytes(b"\x80" * 4096)
    (path / "adapter").mkdir()
    (path / "adapter" / "adapter_model.safetensors").write_bytes(b"w" * 1024)
    runs.mark_complete(path)
    return path


def test_a_checkpoint_cut_short_after_its_save_is_skipped_by_auto_and_refused_by_path(tmp_path, caplog):
    interrupted_run(tmp_path / "run")
    good = saved_checkpoint(tmp_path / "run", 2)
    bad = saved_checkpoint(tmp_path / "run", 4)
    assert runs.checkpoint_damage(good) is None and latest_checkpoint(tmp_path / "run") == bad
    (bad / "optimizer.pt").write_bytes(b"\x80" * 100)  # the disk filled up while it was copied back
    with caplog.at_level("WARNING", logger="rlhf"):
        assert latest_checkpoint(tmp_path / "run") == good
    assert "checkpoint-4 is damaged (optimizer.pt has 100 bytes, 4096 when it was saved)" in caplog.text
    assert refused_resume(tmp_path, bad) == (
        f"--resume {bad}: damaged checkpoint (optimizer.pt has 100 bytes, 4096 when it was saved): "
        "resume from another checkpoint, or --resume auto for the newest complete one")
    (good / "adapter" / "adapter_model.safetensors").unlink()
    assert runs.checkpoint_damage(good) == "adapter/adapter_model.safetensors is missing"
    assert latest_checkpoint(tmp_path / "run") is None


def test_markers_of_older_checkpoints_are_trusted(tmp_path):
    old = checkpoint(tmp_path, 3)
    (old / "COMPLETE").write_text("3\n")
    assert runs.checkpoint_damage(old) is None and latest_checkpoint(tmp_path) == old
