"""Whether a model or dataset reference is a path on this machine or a hub id, and a fast answer when it is
neither there nor reachable.

    check_model_ref("work/nope")         # DataError: work/nope: no such file or directory
    check_model_ref("someone/model")     # cached, or the hub answers: fine; unreachable: DataError
    check_dataset_ref("someone/dataset")

Left to itself, transformers (and datasets) asks the hub for any name that is not a local directory: a
mistyped local path becomes "Repo id must be in the form 'namespace/repo_name'", and an offline machine
waits through huggingface_hub's retries (1+2+4+8+8 s per file, a warning line each) before it fails. One
probe without retries tells the same thing at once. Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from rlhf_cli.errors import DataError

if TYPE_CHECKING:
    from rlhf_cli.runs import ResolvedModel

RepoType = Literal["model", "dataset"]


def is_local_path(ref: str) -> bool:
    """A reference that means a path here, never a hub id: it starts with . / or ~ (./x, ../x, .assets/x: no
    hub name starts with a dot), has more than one "/" (a hub id is namespace/name), or its first component
    is a directory here (runs/sft, work/model)."""
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        return True
    return "/" in ref and Path(ref.split("/")[0]).is_dir()


def check_model_ref(ref: str) -> None:
    """A model or tokenizer reference that can be loaded, as far as can be told without loading it."""
    _check(ref, "model", "give a local model directory, a run directory, or a hub id that is cached locally")


def check_dataset_ref(ref: str) -> None:
    """A data source that is not a local file or folder: a hub dataset that is cached or reachable."""
    _check(ref, "dataset", "give a local file or folder (.jsonl, .json, .parquet, .csv, .txt), or a hub dataset that is cached locally")


def _check(ref: str, repo_type: RepoType, fix: str) -> None:
    if Path(ref).expanduser().exists():
        return
    if is_local_path(ref):
        what = "model directory" if repo_type == "model" else "data file or folder"
        raise DataError(f"{ref}: no such file or directory (a local {what}, so not looked up on the hub)")
    reason = _hub_unreachable(ref, repo_type)
    if reason is not None:
        raise DataError(f"{ref}: neither a local path nor reachable on the hub ({reason}); {fix}")


def _hub_unreachable(ref: str, repo_type: RepoType) -> str | None:
    """Why `ref` cannot come from the hub, or None when it may: it is cached, the machine is offline (the
    loader then reads the cache alone, without retries), or the hub knows it."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if huggingface_hub.is_offline_mode() or _cached(ref, repo_type):
        return None
    try:
        huggingface_hub.repo_info(ref, repo_type=repo_type, timeout=10)
    except GatedRepoError:
        return None  # the loader says how to get access
    except RepositoryNotFoundError:
        return f"no {repo_type} {ref} there, or it is private: check the name, or log in with `hf auth login`"
    except HfHubHTTPError:
        return None  # the hub answered: let the loader ask it properly
    except Exception as e:  # no network, DNS, proxy, timeout: what http_backoff would retry 5 times
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else 'no answer'}"
    return None


def _cached(ref: str, repo_type: RepoType) -> bool:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        snapshot_download(ref, repo_type=repo_type, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError):  # ValueError: not a valid repo id
        return False
    return True


def check_resolved(resolved: ResolvedModel) -> None:
    """The base and the tokenizer a resolved model loads from (a run's are checked through its run.json)."""
    for ref in dict.fromkeys(r for r in (resolved.base, resolved.tokenizer) if r):
        check_model_ref(ref)
