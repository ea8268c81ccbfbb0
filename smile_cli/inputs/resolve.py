"""What a ref names: a local model folder as it is, or a Hub id `org/name[@revision]` (its snapshot in the local
Hugging Face cache, downloaded when needed: the path for an input read from local files; hub_checkpoint.py reads an
online Hub id from its remote headers instead). A missing repository or revision is one line, exit 2.
"""

from __future__ import annotations

import re
from pathlib import Path

from smile_cli.errors import InputError

# Files fetched from the Hub: weights in safetensors, configs, tokenizer and chat-template files.
HUB_ALLOW_PATTERNS = ["*.safetensors", "*.json", "tokenizer*", "*.model", "*.jinja", "*.txt", "README.md"]
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")


def resolve(ref: str, *, allow_download: bool = True) -> tuple[Path, str | None]:
    """A local folder as is, or a Hub id `org/name[@revision]` resolved to its snapshot folder.

    Returns (folder, revision); the revision is the snapshot's commit hash for Hub ids, None for folders.
    """
    local = Path(ref).expanduser()
    if local.exists():
        if not local.is_dir():
            raise InputError(f"{ref}: not a folder (give a model folder or a Hub id org/name)")
        return local.resolve(), None
    if not _hub_id_form(ref):
        raise InputError(f"{ref}: no such folder, and not a Hub id of the form org/name[@revision]")
    repo_id, _, revision = ref.partition("@")
    return _snapshot(ref, repo_id, revision or None, allow_download)


def _snapshot(ref: str, repo_id: str, revision: str | None, allow_download: bool) -> tuple[Path, str]:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    local_only = constants.HF_HUB_OFFLINE or not allow_download
    try:
        folder = Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=HUB_ALLOW_PATTERNS,
                local_files_only=local_only,
            )
        )
    except (hub_errors.RevisionNotFoundError, hub_errors.RepositoryNotFoundError) as e:
        raise repository_error(ref, e) from e
    except hub_errors.LocalEntryNotFoundError as e:
        why = "offline (HF_HUB_OFFLINE=1)" if local_only else "the Hub cannot be reached"
        raise InputError(f"{ref}: not in the local Hugging Face cache and {why}") from e
    except (hub_errors.HfHubHTTPError, OSError, ValueError) as e:
        raise InputError(f"{ref}: cannot fetch from the Hub: {str(e).splitlines()[0]}") from e
    return folder, folder.name


def repository_error(ref: str, error: Exception) -> InputError:
    """The one line for a Hub error that names the repository or revision as missing (a gated repository is one)."""
    from huggingface_hub import errors as hub_errors

    if isinstance(error, hub_errors.RevisionNotFoundError):
        return InputError(f"{ref}: revision '{ref.partition('@')[2]}' not found on the Hub")
    if isinstance(error, hub_errors.GatedRepoError):
        return InputError(f"{ref}: gated model; accept its licence on the Hub and log in")
    return InputError(f"{ref}: no such model on the Hub (or it is private and no token is set)")


def is_hub_ref(ref: str) -> bool:
    """Whether ref names a Hub repository (org/name[@revision]) rather than an existing local path."""
    return not Path(ref).expanduser().exists() and _hub_id_form(ref)


def _hub_id_form(ref: str) -> bool:
    return bool(HUB_ID.match(ref)) and not ref.startswith((".", "/", "~"))


def offline() -> bool:
    """HF_HUB_OFFLINE: Hub ids are then read from the local cache only."""
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE
