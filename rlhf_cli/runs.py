"""Run directories: the contract between stages.

    runs/NAME/
      run.json        manifest (status, base model, parent run, what the model is, metrics, recipe, versions)
      recipe.yaml     the resolved recipe, re-runnable as is
      metrics.jsonl   one JSON object per logged step
      adapter/ | model/, tokenizer/, checkpoints/
      .lock           flock'ed by the one process that owns the run (and names it), for the life of that process
      .replaced/      the completed run that --overwrite replaces, kept until the new run completes (put
                      back if it fails)

run.json and recipe.yaml are written atomically (temp file + rename). Only rank 0 writes, and only rank 0
takes the lock. Every stage claims its directory through prepare_run, the one place that decides whether a
directory may be used, cleared or resumed.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import difflib
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from rlhf_cli.core import distributed
from rlhf_cli.errors import DataError, RecipeError

log = logging.getLogger("rlhf")

SCHEMA_VERSION = 1
MANIFEST = "run.json"
LOCK = ".lock"
REPLACED = ".replaced"
Status = Literal["running", "completed", "failed", "interrupted"]
ModelKind = Literal["adapter", "full", "reward-adapter", "reward-full"]
_ABSENT = object()
# How every refused resume ends: the ways to make the run a new one.
_START_OVER = "start over with --resume never, --overwrite, or another --output-dir"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# peft writes safetensors (safe_serialization=True); older runs may hold the pickle format.
_ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# Recipe keys a resumed run may change: how long it trains, how often it logs, evaluates and saves, where it
# writes. Any other change (lr, data, LoRA rank, seed, ...) makes it another run, which resume refuses.
RESUMABLE_KEYS = frozenset({
    "output_dir",
    "train.epochs", "train.max_steps", "train.logging_steps", "train.eval_steps", "train.save_steps",
    "train.save_total_limit", "train.report_to",
    "ppo.iterations", "ppo.save_steps", "ppo.save_total_limit", "ppo.report_to",
    "grpo.iterations", "grpo.save_steps", "grpo.save_total_limit", "grpo.report_to",
})
_VERSIONED = ("rlhf-cli", "torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes")


def is_main_process() -> bool:
    """Rank 0 under torchrun / accelerate launch (both set RANK), or a plain single process."""
    return distributed.is_main()


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temp file in the same directory, fsync, then rename over the target."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        # The temp file's random name means nothing to the user: name the file they asked for.
        raise OSError(e.errno, e.strerror, str(path)) from None
    try:
        # mkstemp creates 0600 files; give the result the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_leftover(name: str, target: str) -> bool:
    """Whether a file named `name` is the temp file of an atomic_write_text of `target` that was killed."""
    return name.startswith(f".{target}.") and name.endswith(".tmp")


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_manifest(run_dir: Path) -> dict[str, Any] | None:
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: run.json is not valid JSON ({e.msg})") from None


def mark_complete(folder: Path) -> None:
    """Drop COMPLETE into a checkpoint once everything is saved: it lists the size of every file, so a file
    cut short or lost afterwards (a full disk, an interrupted copy) is found before a resume reads it."""
    folder = Path(folder)
    sizes = {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
             if f.is_file() and f.name != "COMPLETE"}
    atomic_write_json(folder / "COMPLETE", {"files": sizes})


def prune_checkpoints(root: Path, keep: int | None) -> None:
    """Keep the `keep` newest marked checkpoints under root (all with None); older ones go. Call it only
    once the newest is marked COMPLETE, so the checkpoint a resume needs is never the one deleted."""
    if not keep:
        return
    done = sorted((int(m.group(1)), p) for p in Path(root).glob("checkpoint-*")
                  if (m := _CHECKPOINT.match(p.name)) and (p / "COMPLETE").exists())
    for _, p in done[:-keep]:
        shutil.rmtree(p, ignore_errors=True)


def checkpoint_damage(folder: Path) -> str | None:
    """What makes a checkpoint unusable (no COMPLETE marker, a listed file missing or of another size), or
    None when it is whole. Markers without a file list (older checkpoints) are trusted as they are."""
    marker = Path(folder) / "COMPLETE"
    if not marker.is_file():
        return "no COMPLETE marker: its save was cut short"
    try:
        listed = json.loads(marker.read_text(encoding="utf-8")).get("files")
    except (ValueError, UnicodeDecodeError, AttributeError):
        listed = None
    for name, size in (listed if isinstance(listed, dict) else {}).items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} when it was saved"
    return None


def latest_checkpoint(run_dir: Path) -> Path | None:
    """Newest whole checkpoint (highest step) under run_dir/checkpoints; damaged newer ones are named and skipped."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return None
    found = sorted(((int(m.group(1)), child) for child in root.iterdir()
                    if (m := _CHECKPOINT.match(child.name)) and child.is_dir()), reverse=True)
    for _, child in found:
        damage = checkpoint_damage(child)
        if damage is None:
            return child
        # A crash mid-save leaves no marker: that one is skipped quietly, as it always was.
        if (child / "COMPLETE").exists():
            log.warning("%s is damaged (%s): resuming from an earlier checkpoint", child, damage)
    return None


def checkpoint_step(path: Path) -> int:
    m = _CHECKPOINT.match(Path(path).name)
    if not m:
        raise DataError(f"{path}: not a checkpoint directory (expected checkpoints/checkpoint-N)")
    return int(m.group(1))


@dataclass
class RunDir:
    """One run directory, owned by the stage that writes it."""

    path: Path
    stage: str
    manifest: dict[str, Any] = field(default_factory=dict)
    resume_from: Path | None = None
    handed_back: bool = False  # failed, it gave the directory back to the completed run it was to replace

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def update(self, **fields: Any) -> None:
        """Merge fields into run.json and rewrite it atomically (rank 0 only)."""
        self.manifest.update(fields)
        if is_main_process() and not self.handed_back:
            atomic_write_json(self.path / MANIFEST, self.manifest)

    def finish(self, status: Status, metrics: dict[str, Any] | None = None, **fields: Any) -> None:
        """The run's end in run.json. The completed run an --overwrite set aside (.replaced/) goes once this
        run completes, and comes back when it fails: a failing command leaves what existed before."""
        if metrics is not None:
            fields["metrics"] = metrics
        replacing = is_main_process() and not self.handed_back and (self.path / REPLACED).is_dir()
        if status == "failed" and replacing:
            # The put-back brings the completed run's own run.json: the failed one is not written, so a full
            # disk (often the very failure) cannot keep the completed run aside.
            self.manifest.update(status=status, finished_at=now(), **fields)
            _put_back(self.path)
            self.handed_back = True
            log.warning("%s: the completed run this one was to replace is back in place", self.path)
            return
        self.update(status=status, finished_at=now(), **fields)
        if status == "completed" and replacing:
            shutil.rmtree(self.path / REPLACED)

    def log_metrics(self, record: dict[str, Any]) -> None:
        if not is_main_process():
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics_file.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=float) + "\n")

    def truncate_metrics(self, after_step: int, key: str = "step") -> None:
        """On resume, drop lines logged after the checkpoint so the curve continues without duplicates."""
        if not self.metrics_file.exists() or not is_main_process():
            return
        kept = [line for line, record in _metric_records(self.metrics_file) if record.get(key, 0) <= after_step]
        atomic_write_text(self.metrics_file, "".join(k + "\n" for k in kept))


def _metric_records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """metrics.jsonl's lines with their records. A crash mid-write tears the last line, which is dropped with a
    warning so the run can resume; an undecodable line anywhere else is damage the user must see."""
    lines = [(n, raw) for n, raw in enumerate(path.read_bytes().split(b"\n"), 1) if raw.strip()]
    out = []
    for n, raw in lines:
        try:
            record = json.loads(raw)
        except ValueError:  # JSONDecodeError, or UnicodeDecodeError for bytes that are not UTF-8
            if n == lines[-1][0]:
                log.warning("%s:%d: dropping the torn last line (the run stopped while writing it)", path, n)
                break
            raise DataError(f"{path}:{n}: not a valid JSON line: fix or delete that line, or start over with --resume never") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{n}: not a JSON object: fix or delete that line, or start over with --resume never")
        out.append((raw.decode("utf-8"), record))
    return out


def prepare_run(
    output_dir: str | Path,
    stage: str,
    recipe_yaml: str,
    recipe_json: dict[str, Any],
    *,
    resume: str = "auto",
    overwrite: bool = False,
    base_model: Any = None,
    parent_run: str | None = None,
    inputs: Sequence[ResolvedModel | None] = (),
    data_fingerprint: str | None = None,
) -> RunDir:
    """Claim output_dir for a new run, or pick up an interrupted one.

    - output_dir may not hold anything the run reads: the parent run, nor any run or model in `inputs`
      (the policy and the reward model of ppo, each with the runs it was trained from);

    - a completed run there: refused unless overwrite (re-running never silently says "done" or clobbers);
    - a run of another stage: refused unless overwrite (which replaces it);
    - an interrupted/failed run with checkpoints and resume=auto: continues from the newest complete one;
    - resume=PATH: continues from that checkpoint, which must be a complete one of this very run
      (output_dir/checkpoints/checkpoint-N): a checkpoint of another run directory is refused, because the
      run it continues (manifest, metrics, later checkpoints) is the one in output_dir; to continue that
      other run, give its directory as output_dir. With overwrite, PATH may continue a completed run;
    - a non-empty directory that holds no run (no run.json) is refused, overwrite or not: --overwrite
      replaces runs, never other files;
    - resuming is refused when the recipe, an input run or the data (data_fingerprint, core.data.fingerprint
      of the records read) changed since the run started.

    Under several processes rank 0 alone checks and writes; the others receive its decision (or its
    error, raised on every rank alike).
    """

    def claim() -> dict[str, Any]:
        run = _claim(output_dir, stage, recipe_yaml, recipe_json, resume=resume, overwrite=overwrite,
                     base_model=base_model, parent_run=parent_run, inputs=inputs, data_fingerprint=data_fingerprint)
        return {"path": str(run.path), "manifest": run.manifest,
                "resume_from": str(run.resume_from) if run.resume_from is not None else None}

    decided = distributed.on_main(claim)
    resume_from = decided["resume_from"]
    return RunDir(path=Path(decided["path"]), stage=stage, manifest=decided["manifest"],
                  resume_from=Path(resume_from) if resume_from is not None else None)


def _claim(
    output_dir: str | Path,
    stage: str,
    recipe_yaml: str,
    recipe_json: dict[str, Any],
    *,
    resume: str,
    overwrite: bool,
    base_model: Any,
    parent_run: str | None,
    inputs: Sequence[ResolvedModel | None],
    data_fingerprint: str | None,
) -> RunDir:
    path = Path(output_dir)
    _refuse_inputs(path, stage, parent_run, inputs)
    # What no other process can change is refused before the lock, so nothing is created there.
    _refuse_non_run(path)
    wanted = _wanted_checkpoint(path, resume)
    give_back = _hold(path) if is_main_process() else _nothing
    try:
        _undo_torn_set_aside(path)
        old = read_manifest(path)
        resume_from = _resume_point(path, stage, old, recipe_json, resume=resume, wanted=wanted, overwrite=overwrite)
        if resume_from is not None and old is not None:
            _refuse_changed_inputs(path, old)
            _refuse_changed_data(path, old, data_fingerprint)
    except BaseException:
        give_back()
        raise
    set_aside = resume_from is None and old is not None and old.get("status") == "completed"
    aside = False  # the completed run is whole in .replaced/
    try:
        if resume_from is None and old is not None:
            _clear(path, set_aside=set_aside)
            aside = set_aside
        if resume_from is not None:
            _drop_later_checkpoints(path, resume_from)
        path.mkdir(parents=True, exist_ok=True)

        manifest = dict(old) if (resume_from is not None and old) else {}
        for key in ("error", "checkpoint"):  # what an earlier session of the run said of how it ended
            manifest.pop(key, None)
        manifest.update(
            schema_version=SCHEMA_VERSION,
            stage=stage,
            status="running",
            started_at=manifest.get("started_at", now()),
            finished_at=None,
            base_model=base_model,
            # Absolute, so later stages and reports find the parent from any working directory.
            parent_run=str(Path(parent_run).resolve()) if parent_run else None,
            recipe=recipe_json,
            fingerprint=_fingerprint_id(recipe_json),
            # A new id for every claim: what a later run records of this one to tell that it was trained again.
            run_id=uuid.uuid4().hex,
            inputs=input_runs([parent_run, *(model.run_dir for model in inputs if model is not None)]),
            data_fingerprint=data_fingerprint,
            versions=package_versions(),
            command=" ".join(sys.argv),
        )
        if resume_from is not None:
            manifest["resumed_from"] = str(resume_from)
        run = RunDir(path=path, stage=stage, manifest=manifest, resume_from=resume_from)
        if is_main_process():
            # run.json first: from then on the directory is a run, whatever else is cut short.
            run.update()
            atomic_write_text(path / "recipe.yaml", recipe_yaml)
    except BaseException:
        # Cut short after the completed run went aside (a full disk, Ctrl-C), the claim puts it back: left in
        # .replaced/ under its own run.json, the next --overwrite would delete it as a run replaced long ago.
        if aside:
            _put_back(path)
        elif set_aside:
            _undo_torn_set_aside(path)
        give_back()
        raise
    return run


def _refuse_inputs(path: Path, stage: str, parent_run: str | None, inputs: Sequence[ResolvedModel | None]) -> None:
    """An input is never an output: clearing or resuming output_dir would delete or rewrite what this run
    loads (the run it starts from, a reward model, or any run those were trained from)."""
    target = path.resolve()
    if parent_run and Path(parent_run).resolve() == target:
        raise RecipeError(f"{path} is the run this {stage} run starts from: choose another --output-dir")
    for read in (p for model in inputs if model is not None for p in model.local_paths):
        held = Path(read).resolve()
        if held == target:
            raise RecipeError(f"{path} is an input of this {stage} run: choose another --output-dir")
        if target in held.parents:
            raise RecipeError(f"{path} holds {read}, an input of this {stage} run: choose another --output-dir")


def input_runs(folders: Iterable[str | None]) -> dict[str, str]:
    """run.json (and eval.json) `inputs`: the run_id of each of these folders that holds a run (the run a run
    starts from, the policy and reward runs of ppo, the models an eval judged), by absolute path. Other
    folders, hub ids and runs written before run ids existed are left out."""
    out: dict[str, str] = {}
    for folder in dict.fromkeys(d for d in folders if d):
        if not Path(folder).is_dir():
            continue
        manifest = read_manifest(Path(folder))
        if manifest and manifest.get("run_id"):
            out[str(Path(folder).resolve())] = manifest["run_id"]
    return out


def changed_inputs(record: dict[str, Any]) -> list[str]:
    """The runs a run (its run.json) or an eval (its eval.json) read that have been trained again or removed
    since, one phrase each (empty: none). A run trained again has another run_id; what read it was made
    from what it held before."""
    changed = []
    for folder, run_id in (record.get("inputs") or {}).items():
        try:
            now_there = read_manifest(Path(folder))
        except DataError:
            now_there = {}
        if now_there is None:
            changed.append(f"{folder} is gone")
        elif now_there.get("run_id") != run_id:
            when = now_there.get("finished_at") or now_there.get("started_at")
            changed.append(f"{folder} was trained again" + (f" (finished {when})" if when else ""))
    return changed


def _refuse_changed_inputs(path: Path, old: dict[str, Any]) -> None:
    """Resume continues the same run: checkpoints trained against an input that has since been trained
    again would be continued against other weights (another reference, another reward model)."""
    changed = changed_inputs(old)
    if changed:
        raise RecipeError(
            f"{path}: since this run started, {'; '.join(changed)}; its checkpoints were trained against the "
            f"earlier weights: {_START_OVER}"
        )


def _refuse_changed_data(path: Path, old: dict[str, Any], data_fingerprint: str | None) -> None:
    """Resume continues the same run: its checkpoints, and the batches it skips to get back to their step,
    belong to the records it started with."""
    recorded = old.get("data_fingerprint")
    if recorded is not None and data_fingerprint is not None and recorded != data_fingerprint:
        raise RecipeError(
            f"{path}: the data changed since this run started (the records read from the recipe's data files "
            f"differ); its checkpoints were trained on the earlier records: restore those files, or {_START_OVER}"
        )


def _refuse_non_run(path: Path) -> None:
    """Only a run directory (one holding run.json) or an empty one may be claimed: anything else is the
    user's, and no flag makes it ours. A lock and the temp file of a first run.json whose claim was killed are
    ours: such a directory counts as empty."""
    if path.is_dir() and not (path / MANIFEST).is_file() and any(
            child.name != LOCK and not write_leftover(child.name, MANIFEST) for child in path.iterdir()):
        raise RecipeError(f"{path} is not empty and holds no run (no {MANIFEST}): choose a new or empty --output-dir")


def check_resume(output_dir: str | Path, resume: str) -> None:
    """--resume PATH names a checkpoint of output_dir's run (auto and never always do); raises otherwise."""
    _wanted_checkpoint(Path(output_dir), resume)


def _wanted_checkpoint(path: Path, resume: str) -> Path | None:
    """The checkpoint --resume PATH names, checked to be one of this run's; None for auto / never."""
    if resume in ("auto", "never"):
        return None
    wanted = Path(resume)
    if not wanted.is_dir():
        close = difflib.get_close_matches(resume, ["auto", "never"], n=1)
        hint = f" (did you mean --resume {close[0]}?)" if close else " (or --resume auto | never)"
        raise DataError(f"--resume {resume}: checkpoint directory not found{hint}")
    checkpoint_step(wanted)
    if wanted.resolve().parent != (path / "checkpoints").resolve():
        raise RecipeError(
            f"--resume {resume}: not a checkpoint of {path} (expected {path / 'checkpoints'}/checkpoint-N): "
            "to continue the run it belongs to, pass that run's directory as --output-dir"
        )
    return wanted


def _resume_point(path: Path, stage: str, old: dict[str, Any] | None, recipe_json: dict[str, Any], *, resume: str,
                  wanted: Path | None, overwrite: bool) -> Path | None:
    """The checkpoint the claim continues from, or None to start over; raises where the run may not be claimed.

    The same rules hold for --resume auto and --resume PATH; only what is resumed differs.
    """
    if old is None:
        return None
    if old.get("stage") != stage:
        if wanted is not None:
            raise RecipeError(
                f"--resume {resume}: {path} holds a `{old.get('stage')}` run, not `{stage}`: "
                f"its checkpoints do not continue a {stage} run; choose another --output-dir"
            )
        if not overwrite:
            raise RecipeError(
                f"{path} holds a `{old.get('stage')}` run, not `{stage}`: choose another --output-dir or pass --overwrite"
            )
    if old.get("status") == "completed" and not overwrite:
        raise RecipeError(f"{path} holds a completed {stage} run: pass --overwrite to replace it, or choose another --output-dir")
    if old.get("status") == "running":
        # This process holds the lock, so no other runs it: it was stopped before it could say so.
        log.warning("%s: run.json says running but no process holds the run: it stopped without finishing "
                    "(killed?); it is treated as interrupted", path)
    if wanted is not None:
        damage = checkpoint_damage(wanted)  # checked under the lock: its writer may be saving it right now
        if damage is not None:
            what = "incomplete checkpoint" if damage.startswith("no COMPLETE") else "damaged checkpoint"
            raise RecipeError(
                f"--resume {resume}: {what} ({damage}): "
                "resume from another checkpoint, or --resume auto for the newest complete one"
            )
        point: Path | None = wanted
    elif resume == "auto" and not overwrite:
        # An unfinished run with no checkpoint yet is started over in place.
        point = latest_checkpoint(path)
    else:
        return None
    if point is not None:
        _refuse_changed_recipe(path, old.get("recipe") or {}, recipe_json)
        _refuse_past_the_end(path, point, recipe_json)
    return point


# The recipe keys that set a run's last step (Trainer stages, ppo, grpo), and the one that sets it in epochs.
_LAST_STEP_KEYS = ("train.max_steps", "ppo.iterations", "grpo.iterations")
_EPOCHS_KEY = "train.epochs"


def _refuse_past_the_end(path: Path, point: Path, recipe_json: dict[str, Any]) -> None:
    """A checkpoint beyond the recipe's last step would resume into a run that trains nothing and calls
    itself completed at a length it never had: the shortened recipe is refused instead."""
    flat, step = _dotted(recipe_json), checkpoint_step(point)
    for key in _LAST_STEP_KEYS:
        last = flat.get(key)
        if isinstance(last, int) and step > last:
            raise RecipeError(
                f"{path}: {point.name} is at step {step}, past {key}={last}: to continue this run set {key} to "
                f"{step} or more; to train a shorter one, {_START_OVER}"
            )
    epochs = flat.get(_EPOCHS_KEY)
    if flat.get("train.max_steps") is None and isinstance(epochs, (int, float)):
        done = _checkpoint_epoch(point)
        # The tolerance absorbs the float sum behind Trainer's epoch counter, not a step.
        if done is not None and done > epochs + 1e-6:
            raise RecipeError(
                f"{path}: {point.name} has trained {done:.2f} epochs, past {_EPOCHS_KEY}={epochs}: to continue this run "
                f"set {_EPOCHS_KEY} to {math.ceil(done)} or more; to train a shorter one, start over with --resume never, "
                "--overwrite, or another --output-dir"
            )


def _checkpoint_epoch(point: Path) -> float | None:
    """The epochs a Trainer checkpoint has trained (its trainer_state.json), or None where it says none."""
    try:
        epoch = json.loads((point / "trainer_state.json").read_text()).get("epoch")
    except (OSError, ValueError, AttributeError):
        return None
    return float(epoch) if isinstance(epoch, (int, float)) else None


def recipe_fingerprint(recipe_json: dict[str, Any]) -> dict[str, Any]:
    """What makes a run the run it is: every dotted key of the resolved recipe except RESUMABLE_KEYS."""
    return {key: value for key, value in _dotted(recipe_json).items() if key not in RESUMABLE_KEYS}


def _fingerprint_id(recipe_json: dict[str, Any]) -> str:
    """run.json `fingerprint`: a short id of recipe_fingerprint, equal for runs that are the same run."""
    canonical = json.dumps(recipe_fingerprint(recipe_json), sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _dotted(obj: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(obj, dict) or not obj:
        return {prefix: obj}
    flat: dict[str, Any] = {}
    for key, value in obj.items():
        flat.update(_dotted(value, f"{prefix}.{key}" if prefix else key))
    return flat


def changed_keys(old: dict[str, Any], new: dict[str, Any], *, resumable: bool = False) -> list[str]:
    """The dotted keys in which two resolved recipes differ, sorted; resumable=True leaves out the keys a
    resumed run may change (RESUMABLE_KEYS)."""
    before, after = (recipe_fingerprint(old), recipe_fingerprint(new)) if resumable else (_dotted(old), _dotted(new))
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k, _ABSENT) != after.get(k, _ABSENT))
    # A section that appeared or vanished (lora: null -> {r: 16}) is named once, not key by key.
    return [k for k in changed if not any(k.startswith(f"{other}.") for other in changed)]


def _refuse_changed_recipe(path: Path, old: dict[str, Any], new: dict[str, Any]) -> None:
    """Resume continues the same run: a checkpoint trained with other settings would silently mix two runs."""
    changed = changed_keys(old, new, resumable=True)
    if changed:
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        raise RecipeError(
            f"{path}: the recipe changed since this run started ({shown}); resuming continues the same run: "
            f"restore those keys, or {_START_OVER}"
        )


# Run directories this process holds, each with its lock file's descriptor. They stay open until the process
# ends, so the kernel releases the lock on any exit (SIGKILL included), and at no other time.
_HELD: dict[Path, int] = {}


def hold(path: Path) -> Callable[[], None]:
    """An output directory that is not a run's (eval's), owned by this process as a run directory is: created
    if need be and locked, or RecipeError naming its holder. The returned call releases it and removes the
    lock file this call made (and the directories it made, while they are empty)."""
    made = [p for p in (path, *path.parents) if not p.exists()]
    undo = _hold(path)

    def release() -> None:
        undo()
        for p in made:
            with contextlib.suppress(OSError):
                p.rmdir()

    return release


def _hold(path: Path) -> Callable[[], None]:
    """Lock the run directory for this process (flock on path/.lock, which records the holder), or raise
    naming the process that holds it. Returns how to undo this call, for a claim refused after locking: the
    lock is released and a lock file this call created is removed, so a refused directory is left as it was.
    """
    path.mkdir(parents=True, exist_ok=True)
    key = path.resolve()
    if key in _HELD:  # claimed before by this very process, one run after another
        return _nothing
    fd, created = _lock(path)
    previous = _read_all(fd)
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv), "since": now()}
    _rewrite(fd, (json.dumps(holder) + "\n").encode())
    _HELD[key] = fd

    def undo() -> None:
        if created:
            (path / LOCK).unlink(missing_ok=True)  # while still locked: a process waiting on this file sees it go and retries
        else:
            _rewrite(fd, previous)
        os.close(_HELD.pop(key))

    return undo


def _lock(path: Path) -> tuple[int, bool]:
    """An open descriptor of path/.lock holding its flock, and whether this call created the file."""
    lock = path / LOCK
    while True:
        try:
            fd, created = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), True
        except FileExistsError:
            try:
                fd, created = os.open(lock, os.O_RDWR), False
            except FileNotFoundError:
                continue  # removed by a claim that was refused meanwhile
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RecipeError(
                f"{path} is in use by another process ({holder}): wait for it to finish, or choose another --output-dir"
            ) from None
        # Locked the file that is there now, not one a refused claim removed after it was opened here.
        try:
            if os.fstat(fd).st_ino == os.stat(lock).st_ino:
                return fd, created
        except FileNotFoundError:
            pass
        os.close(fd)


def _read_all(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _rewrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _holder(fd: int) -> str:
    try:
        holder = json.loads(_read_all(fd))
        return f"pid {holder['pid']} on {holder['host']}: {holder['command']}"
    except (ValueError, KeyError, TypeError):
        return "it has not recorded itself yet"


def _live_holder(path: Path) -> str | None:
    """Who holds the run directory's lock now (a run in progress), or None when no process does."""
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _holder(fd)
    finally:
        os.close(fd)  # closing releases a lock this call took
    return None


def _nothing() -> None:
    pass


def _clear(path: Path, *, set_aside: bool = False) -> None:
    """Empty a run directory for a new run, keeping its lock and the completed run kept aside (.replaced/).
    run.json stays until the new one replaces it, so a crash here still leaves a run directory (never one
    that no longer counts as a run).

    set_aside: the run there is a completed one (--overwrite): it moves into .replaced/ (renames, no copy)
    instead of being deleted, and stays there until the new run completes (RunDir.finish)."""
    if not is_main_process():
        return
    aside = path / REPLACED
    if set_aside:
        if aside.exists():
            shutil.rmtree(aside)  # an older completed run, replaced since by the one set aside now
        tmp = path / f"{REPLACED}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        for child in path.iterdir():
            if child.name not in (MANIFEST, LOCK, tmp.name):
                os.replace(child, tmp / child.name)
        shutil.copy2(path / MANIFEST, tmp / MANIFEST)
        os.replace(tmp, aside)  # whole or not at all: a crash before this leaves no half-kept run
        return
    _empty(path)


def _drop_later_checkpoints(path: Path, point: Path) -> None:
    """Checkpoints after the one a run resumes from belong to the continuation it replaces: left there,
    --resume auto would later pick one of them (a step the resumed run never trained, beside metrics of
    the new one), and the resumed run would save its own over theirs."""
    if not is_main_process():
        return
    step = checkpoint_step(point)
    later = sorted((d for d in path.joinpath("checkpoints").glob("checkpoint-*")
                    if _CHECKPOINT.match(d.name) and checkpoint_step(d) > step), key=checkpoint_step)
    if later:
        log.warning("%s: resuming from %s drops the later %s", path, point.name, ", ".join(d.name for d in later))
    for d in later:
        shutil.rmtree(d)


def _undo_torn_set_aside(path: Path) -> None:
    """A claim killed while it moved a completed run aside (_clear) left part of it in .replaced.tmp: back in place."""
    tmp = path / f"{REPLACED}.tmp"
    if not is_main_process() or not tmp.is_dir():
        return
    for child in tmp.iterdir():
        if not (path / child.name).exists():
            os.replace(child, path / child.name)
    shutil.rmtree(tmp)


def _empty(path: Path) -> None:
    """Delete what a run directory holds but run.json, its lock and the completed run kept aside."""
    for child in path.iterdir():
        if child.name in (MANIFEST, LOCK, REPLACED):
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


def _put_back(path: Path) -> None:
    """The completed run in .replaced/ back in its place, the failed run that was to replace it gone.
    run.json is put back last, in one rename: until then the directory is the failed run."""
    aside = path / REPLACED
    _empty(path)
    for child in aside.iterdir():
        if child.name != MANIFEST:
            os.replace(child, path / child.name)
    os.replace(aside / MANIFEST, path / MANIFEST)
    aside.rmdir()


# --------------------------------------------------------------------------- resolving models


@dataclass(frozen=True)
class ResolvedModel:
    """What a model reference means: base weights plus adapters applied in order.

    `rlhf ppo --policy runs/sft` resolves runs/sft/run.json into the base it was trained on, the SFT
    adapter, and the tokenizer (with the chat template used in training).
    """

    base: str
    gguf_file: str | None = None
    adapters: tuple[str, ...] = ()
    tokenizer: str | None = None
    kind: Literal["causal-lm", "reward"] = "causal-lm"
    run_dir: str | None = None
    trust_remote_code: bool = False

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.base

    @property
    def local_paths(self) -> tuple[str, ...]:
        """The local files and folders loading this model reads: its run, the runs it was trained from
        (through their adapters), the base and the tokenizer. A hub id names no local path."""
        named = (self.run_dir, self.base, *self.adapters, self.tokenizer)
        return tuple(p for p in dict.fromkeys(named) if p is not None and Path(p).exists())


def resolve_model(path: str, gguf_file: str | None = None, trust_remote_code: bool = False) -> ResolvedModel:
    """Resolve a hub id, a local model directory, or a run directory (recursively through parents)."""
    p = Path(path)
    manifest = read_manifest(p) if p.is_dir() else None
    if manifest is None:
        if p.is_dir() and not any(p.glob("config.json")) and not (gguf_file or any(p.glob("*.gguf"))):
            raise DataError(f"{path}: neither a run directory (no run.json) nor a model directory (no config.json)")
        return ResolvedModel(base=str(path), gguf_file=gguf_file, trust_remote_code=trust_remote_code)

    status = manifest.get("status")
    if status == "running" and (holder := _live_holder(p)) is not None:
        raise DataError(f"{path}: run is still training ({holder}): wait for it to finish, or give a completed run")
    if status != "completed":
        raise DataError(f"{path}: run is {status}, not completed; finish it with --resume auto first")
    model = manifest.get("model") or {}
    kind = "reward" if str(model.get("kind", "")).startswith("reward") else "causal-lm"
    tokenizer = str(p / model["tokenizer"]) if model.get("tokenizer") else None
    _check_model_files(p, model)
    # Only the caller (the user's flag or recipe) may allow remote code; a run.json never does.
    trust = trust_remote_code
    if model.get("kind") in ("full", "reward-full"):
        return ResolvedModel(base=str(p / model["path"]), tokenizer=tokenizer, kind=kind, run_dir=str(p), trust_remote_code=trust)

    base = manifest.get("base_model") or {}
    if isinstance(base, str):
        base = {"path": base}
    parent = resolve_model(base["path"], base.get("gguf_file"), trust)
    _refuse_changed_parent(p, manifest, parent)
    adapters = parent.adapters + tuple(str(p / a) for a in model.get("adapters", []))
    return ResolvedModel(
        base=parent.base,
        gguf_file=parent.gguf_file,
        adapters=adapters,
        tokenizer=tokenizer or parent.tokenizer,
        kind=kind,
        run_dir=str(p),
        trust_remote_code=trust,
    )


def _refuse_changed_parent(run: Path, manifest: dict[str, Any], parent: ResolvedModel) -> None:
    """A run's adapter is applied on top of its parent run's model: if the parent was trained again since,
    the two were never trained together, and loading them would give a model nobody trained."""
    if parent.run_dir is None:
        return
    folder = str(Path(parent.run_dir).resolve())
    recorded = (manifest.get("inputs") or {}).get(folder)
    parent_id = (read_manifest(Path(parent.run_dir)) or {}).get("run_id")
    if recorded is not None and parent_id != recorded:
        raise DataError(
            f"{run}: trained on top of {parent.run_dir}, which was trained again since: its adapter no longer "
            f"fits the model beneath it; train {run} again, or give another run"
        )


def _check_model_files(run: Path, model: dict[str, Any]) -> None:
    """The files run.json points at must be there: found missing here, not as a loader traceback later."""
    if model.get("kind") in ("full", "reward-full"):
        needed = [(run / model["path"] / "config.json",)]
    else:
        folders = [run / adapter for adapter in model.get("adapters", [])]
        needed = [alternatives for f in folders
                  for alternatives in ((f / "adapter_config.json",), tuple(f / name for name in _ADAPTER_WEIGHTS))]
    for alternatives in needed:
        if not any(path.is_file() for path in alternatives):
            raise DataError(f"{alternatives[0]}: missing, though {run / MANIFEST} names it: restore it, or train that run again")
