"""Model names of a config, a folder or a Hugging Face Hub id (`org/name`, optionally `@revision`), resolved once to
a folder on disk and the commit it came from.

Ids go through `huggingface_hub.snapshot_download`, so the user's `HF_HOME` / `HF_HUB_CACHE`, `HF_HUB_OFFLINE` and
token (`HF_TOKEN` or `hf auth login`) apply as they do for transformers. A name that is an existing folder is
always the folder; a name whose first part is an existing local folder (`models/x`) is read as a path, so a
mistyped path fails as a missing folder, not as a Hub look-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.config import resolve_path
from common.models import ModelError

# org/name[@revision]: the Hub's repo-id characters; a revision is a branch, tag or commit (may hold '/')
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
# weight formats a run never reads (TensorFlow, Flax, ONNX, GGUF, Core ML copies some repositories hold)
SKIPPED_FILES = ["*.h5", "*.msgpack", "*.onnx", "*.onnx_data", "*.gguf", "*.ot", "*.tflite", "*.mlmodel", "coreml/*"]


@dataclass(frozen=True)
class ResolvedModel:
    path: Path  # the folder transformers and vLLM load
    repo_id: str | None = None  # None: a local folder
    commit: str | None = None  # the Hub commit the folder is a snapshot of

    @property
    def pinned(self) -> str | None:
        """`org/name@commit`: the same id again, whatever the branch points at later (None for a folder)."""
        return f"{self.repo_id}@{self.commit}" if self.repo_id else None


def parse_hub_id(name: str) -> tuple[str, str | None] | None:
    """(repo_id, revision) when `name` reads as a Hub id rather than a path, else None."""
    match = _HUB_ID.match(name)
    if match is None or name.startswith((".", "/", "~")):
        return None
    repo = match.group("repo")
    if resolve_path(repo.split("/")[0]).is_dir():  # models/x with a local models/ folder: a path
        return None
    return repo, match.group("rev")


def resolve_model(name: str) -> ResolvedModel:
    """A folder as it is, or a Hub id's snapshot (downloaded into the Hugging Face cache unless offline)."""
    local = resolve_path(name)
    if local.exists():
        return ResolvedModel(local)
    parsed = parse_hub_id(name)
    if parsed is None:
        return ResolvedModel(local)  # a missing folder: the folder checks name it
    repo_id, revision = parsed
    snapshot = download(repo_id, revision)
    return ResolvedModel(Path(snapshot), repo_id, _commit_of(snapshot))


def download(repo_id: str, revision: str | None) -> str:
    """The snapshot folder of `repo_id` at `revision` (default: main) in the Hugging Face cache; ModelError on one
    line when the id or revision does not exist, or is not cached while offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    rev = f" at revision {revision!r}" if revision else ""
    try:
        return snapshot_download(repo_id, revision=revision, ignore_patterns=SKIPPED_FILES)
    except RevisionNotFoundError:
        raise ModelError(f"the Hub model {repo_id} has no revision {revision!r} (a branch, tag or commit)") from None
    except (RepositoryNotFoundError, GatedRepoError) as exc:
        reason = "is gated: accept its licence on the Hub and set HF_TOKEN" if isinstance(exc, GatedRepoError) else ""
        raise ModelError(f"no Hub model {repo_id} ({reason or 'not found, or private: set HF_TOKEN'})") from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        raise ModelError(
            f"{repo_id}{rev} is not a folder, nor in the Hugging Face cache ({constants.HF_HUB_CACHE}), and the Hub "
            f"cannot be reached{' (HF_HUB_OFFLINE is set)' if constants.is_offline_mode() else ''}: download it "
            f"first (hf download {repo_id}{' --revision ' + revision if revision else ''})"
        ) from None
    except HfHubHTTPError as exc:
        raise ModelError(f"{repo_id}{rev}: the Hub answered {str(exc).splitlines()[0]}") from None
    except (OSError, ValueError) as exc:
        raise ModelError(f"{repo_id}{rev}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _commit_of(snapshot: str) -> str | None:
    name = Path(snapshot).name  # .../models--org--name/snapshots/<commit>
    return name if _COMMIT.match(name) else None
