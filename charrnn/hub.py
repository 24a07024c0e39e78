"""The Hugging Face Hub: checkpoints named ``hf:OWNER/NAME[@REVISION]``, downloaded and uploaded.

Downloads go through ``huggingface_hub.snapshot_download`` into the Hub's own cache (the
one transformers, diffusers and datasets share: ``$HF_HUB_CACHE``, by default
``~/.cache/huggingface/hub``), so a model is fetched once and then found offline
(``HF_HUB_OFFLINE=1``, or no network). What was downloaded is then checked like any
local checkpoint (every file against its sha256, no pickle) by ``charrnn.checkpoint``,
whose :func:`~charrnn.checkpoint.resolve_checkpoint` is the one place an ``hf:`` name is
turned into a folder. Uploads create the repository (private unless asked otherwise)
and commit a folder with ``HfApi.upload_folder``. ``HF_ENDPOINT`` and ``HF_TOKEN`` work
as in every Hub library.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ._version import __version__
from .errors import HubError

PREFIX = "hf:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class HubName:
    """``hf:OWNER/NAME[@REVISION]``, taken apart."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return f"{PREFIX}{self.repo_id}" + (f"@{self.revision}" if self.revision else "")


def is_hub_name(spec: object) -> bool:
    """Whether ``spec`` names a Hub checkpoint (``hf:...``) rather than a local path."""
    return isinstance(spec, str) and spec.startswith(PREFIX)


def parse_hub_name(spec: str) -> HubName:
    """``hf:OWNER/NAME[@REVISION]`` -> its parts; anything else is a ``HubError`` that shows the form."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    repo_id, _, revision = body.partition("@")
    if not _REPO_ID.match(repo_id) or (_ and not revision):
        raise HubError(
            f"{spec!r} is not a Hub model name: write hf:OWNER/NAME, or hf:OWNER/NAME@REVISION for a branch, tag or commit"
        )
    return HubName(repo_id, revision or None)


def download_checkpoint(spec: str) -> Path:
    """The local folder of Hub checkpoint ``spec``: from the Hub's cache, downloaded into it first if need be."""
    name = parse_hub_name(spec)
    # Imported here: huggingface_hub is slow to import, and most commands never need it.
    from huggingface_hub import constants, errors, snapshot_download

    try:
        folder = snapshot_download(name.repo_id, revision=name.revision, library_name="charrnn", library_version=__version__)
    except errors.RevisionNotFoundError:
        raise HubError(
            f"{name.repo_id} on the Hub has no revision {name.revision!r}: give a branch, tag or commit it has"
        ) from None
    except errors.RepositoryNotFoundError:
        raise HubError(
            f"no model {name.repo_id} on the Hub, or it is private and no token was given: check the name, or "
            "set HF_TOKEN (or run `hf auth login`)"
        ) from None
    except (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled, errors.IncompleteSnapshotError):
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        raise HubError(
            f"{name} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and the Hub cannot be "
            f"reached{offline}: download it once while online, or pass a local checkpoint"
        ) from None
    except errors.HfHubHTTPError as exc:
        raise HubError(f"the Hub refused {name}: {_first_line(exc)}") from None
    return Path(folder)


def upload_folder(folder: Path, repo_id: str, private: bool = True, message: str = "Upload charrnn checkpoint") -> str:
    """Create Hub model ``repo_id`` if needed (``private`` where new) and commit ``folder``'s files to it; the commit's URL."""
    name = parse_hub_name(repo_id)
    if name.revision:
        raise HubError(f"push to a repository, not a revision: drop '@{name.revision}' from {repo_id!r}")
    import httpx2
    from huggingface_hub import HfApi, errors

    api = HfApi(library_name="charrnn", library_version=__version__)
    try:
        api.create_repo(name.repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=name.repo_id, repo_type="model", commit_message=message)
    except errors.OfflineModeIsEnabled:
        raise HubError("cannot push while HF_HUB_OFFLINE is set: unset it and try again") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = " (log in with `hf auth login` or set HF_TOKEN to a token that may write there)" if status in (401, 403) else ""
        raise HubError(f"the Hub refused the upload to {name.repo_id}: {_first_line(exc)}{hint}") from None
    except (httpx2.TransportError, OSError) as exc:  # connection refused, no DNS, a timeout
        raise HubError(f"cannot reach the Hub to push {name.repo_id}: {exc}") from None
    return str(commit.commit_url)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
