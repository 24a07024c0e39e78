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

The Hub, or whatever ``HF_ENDPOINT`` points at, is not trusted: while charrnn talks to
it, every request has connect and read timeouts, and every answer that the Hub client
builds a cache path from (a commit sha, a file's ETag) must look like the hash it is
before the client sees it. Only the files a checkpoint is made of are fetched, and the
folder returned, with every file in it, must lie inside the Hub cache.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ._version import __version__
from .errors import HubError

PREFIX = "hf:"
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
# A branch, tag or commit: git's ref characters, in parts that are never '.' or '..' (the
# Hub client writes refs/<REVISION> into its cache, so this is a path as well as a name).
_REVISION = re.compile(r"^[A-Za-z0-9_.+-]+(?:/[A-Za-z0-9_.+-]+)*$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_FILE_ETAG = re.compile(r'^(?:W/)?"?[0-9A-Za-z_-]{1,128}"?$')  # a git sha1 or an LFS sha256, quoted
CONNECT_TIMEOUT = 10.0  # seconds to open a connection to the Hub
READ_TIMEOUT = 60.0  # seconds the Hub may stay silent in the middle of an answer

if TYPE_CHECKING:
    import httpx2


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
    if revision and (not _REVISION.match(revision) or any(part in (".", "..") for part in revision.split("/"))):
        raise HubError(
            f"{revision!r} in {spec!r} is not a branch, tag or commit name: use letters, digits and . _ - + / "
            "(no '..', no leading or trailing '/')"
        )
    return HubName(repo_id, revision or None)


class UnsafeHubAnswer(HubError):
    """The Hub answered something that would lead its client outside its cache."""


def _bound_timeouts(request: "httpx2.Request") -> None:
    """Every request to the Hub gets a connect and a read timeout, also where the Hub client asks for none."""
    timeout = dict(request.extensions.get("timeout") or {})
    for key, bound in (("connect", CONNECT_TIMEOUT), ("pool", CONNECT_TIMEOUT), ("read", READ_TIMEOUT)):
        if timeout.get(key) is None or timeout[key] > bound:
            timeout[key] = bound
    request.extensions["timeout"] = timeout


def _check_answer(response: "httpx2.Response") -> None:
    """Refuse an answer whose commit sha or file ETag the Hub client would build a path from, unless it is a hash."""
    path = response.request.url.path
    commit = response.headers.get("x-repo-commit")
    if commit is not None and not _COMMIT.match(commit):
        raise UnsafeHubAnswer(f"the Hub answered {path} with the commit {commit[:80]!r}, which is not a commit sha")
    if "/resolve/" in path:
        for header in ("etag", "x-linked-etag"):
            etag = response.headers.get(header)
            if etag is not None and not _FILE_ETAG.match(etag):
                raise UnsafeHubAnswer(f"the Hub answered {path} with the ETag {etag[:80]!r}, which is not a file hash")
    elif path.startswith("/api/models/") and "/tree/" not in path and response.status_code == 200:
        response.read()  # the repository's info: small, and its sha names the snapshot folder
        try:
            sha = response.json().get("sha")
        except (ValueError, AttributeError):
            return  # not the info the client expects: it fails on it itself
        if sha is not None and not (isinstance(sha, str) and _COMMIT.match(sha)):
            raise UnsafeHubAnswer(f"the Hub answered {path} with the commit {str(sha)[:80]!r}, which is not a commit sha")


@contextmanager
def _guarded_session() -> Iterator[None]:
    """The Hub client's shared HTTP session, with charrnn's timeouts and answer checks while a call runs."""
    from huggingface_hub import get_session

    client = get_session()
    saved = client.event_hooks
    client.event_hooks = {
        "request": [*saved.get("request", []), _bound_timeouts],
        "response": [*saved.get("response", []), _check_answer],
    }
    try:
        yield
    finally:
        client.event_hooks = saved


def _check_inside(folder: Path, cache: Path) -> None:
    """``folder`` and the real path of every file in it lie inside the Hub cache (``cache``)."""
    root = cache.resolve()
    for path in (folder, *folder.iterdir()):
        real = path.resolve()
        if not real.is_relative_to(root):
            raise UnsafeHubAnswer(
                f"the Hub's copy of a file leads outside the Hub cache ({path} is {real}): delete {folder} "
                "and check HF_ENDPOINT points at a Hub you trust"
            )


def download_checkpoint(spec: str, files: Iterable[str]) -> Path:
    """The local folder of Hub checkpoint ``spec``: from the Hub's cache, downloaded into it first if need be.

    Only ``files`` (the names a checkpoint is made of) are fetched: whatever else the
    repository holds stays on the Hub.
    """
    name = parse_hub_name(spec)
    # Imported here: huggingface_hub is slow to import, and most commands never need it.
    from huggingface_hub import constants, errors, snapshot_download

    try:
        with _guarded_session():
            folder = snapshot_download(
                name.repo_id,
                revision=name.revision,
                allow_patterns=list(files),
                etag_timeout=CONNECT_TIMEOUT,
                library_name="charrnn",
                library_version=__version__,
            )
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
    except ValueError as exc:  # the Hub client's own refusal of a path it was sent (a tree entry with '..')
        raise UnsafeHubAnswer(f"the Hub sent {name} with something its client refuses: {_first_line(exc)}") from None
    _check_inside(Path(folder), Path(constants.HF_HUB_CACHE))
    return Path(folder)


def download_url(url: str, out: BinaryIO) -> None:
    """Write what ``url`` holds past ``out``'s current position into ``out`` (a file opened to append).

    The Hub client's downloader: it retries what fails on the way (408, 429, a dropped
    connection, timeouts) and resumes a transfer cut halfway from the last piece it wrote
    (pieces of 10 MB), with charrnn's timeouts. A ``HubError`` says why it gave up.
    """
    import httpx2
    from huggingface_hub import errors
    from huggingface_hub.file_download import http_get

    # Its retries each log a warning; the HubError below is the one sentence the user gets.
    quiet = logging.getLogger("huggingface_hub.file_download")
    level, quiet.level = quiet.level, logging.ERROR
    try:
        with _guarded_session():
            http_get(url, out, resume_size=out.tell(), displayed_filename=url.rsplit("/", 1)[-1])
    except errors.OfflineModeIsEnabled:
        raise HubError("HF_HUB_OFFLINE is set, and the Hub client then fetches nothing") from None
    except (httpx2.HTTPError, errors.HfHubHTTPError, ValueError) as exc:
        raise HubError(_first_line(exc)) from None
    finally:
        quiet.setLevel(level)


def upload_folder(
    folder: Path, repo: str, private: bool = True, message: str = "Upload charrnn checkpoint", files: Iterable[str] = ()
) -> str:
    """Create Hub model ``repo`` (``OWNER/NAME[@BRANCH]``) if needed, ``private`` where new, and commit ``files``
    of ``folder`` to it (to that branch, made from the default one if new); the commit's URL."""
    name = parse_hub_name(repo)
    import httpx2
    from huggingface_hub import HfApi, errors

    api = HfApi(library_name="charrnn", library_version=__version__)
    try:
        with _guarded_session():
            api.create_repo(name.repo_id, repo_type="model", private=private, exist_ok=True)
            if name.revision:
                api.create_branch(name.repo_id, branch=name.revision, repo_type="model", exist_ok=True)
            commit = api.upload_folder(
                folder_path=str(folder),
                repo_id=name.repo_id,
                repo_type="model",
                revision=name.revision,
                allow_patterns=list(files) or None,
                commit_message=message,
            )
    except errors.OfflineModeIsEnabled:
        raise HubError("cannot push while HF_HUB_OFFLINE is set: unset it and try again") from None
    except errors.HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        hint = " (log in with `hf auth login` or set HF_TOKEN to a token that may write there)" if status in (401, 403) else ""
        raise HubError(f"the Hub refused the upload to {name}: {_first_line(exc)}{hint}") from None
    except (httpx2.TransportError, OSError) as exc:  # connection refused, no DNS, a timeout
        raise HubError(f"cannot reach the Hub to push {name}: {exc}") from None
    return str(commit.commit_url)


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
