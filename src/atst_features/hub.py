"""The Hugging Face Hub: cached / offline / pinned downloads of named models and repositories, and uploads.

Downloads go through huggingface_hub and honour ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HOME`` /
``HF_HUB_CACHE`` and tokens (``HF_TOKEN`` or ``huggingface-cli login``), read when the download
happens. Models that ship inside the package (``atst-frame-mini``) resolve to the installed files,
with no network and no cache, after the same sha256 check. A weights file whose sha256 differs from
the registry's (:mod:`atst_features.registry`), or from the Hub's own LFS hash, is never used.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import ssl
import urllib.parse
import urllib.request
from contextlib import contextmanager
from pathlib import Path

from .errors import DownloadError, InputError
from .files import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, verify_sha256
from .registry import PACKAGED_HINT, REGISTRY, PretrainedModel

__all__ = ["cache_dir_of", "download", "looks_like_repo_id", "no_connection", "offline", "packaged_folder", "push_to_hub",
           "unreachable"]

PACKAGED_MODELS = Path(__file__).parent / "models"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CONNECT_TIMEOUT_S = 3  # unreachable(): a host slower than this to accept a connection (a firewall that drops) counts as reachable


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source))


def cache_dir_of(cache_dir: str | os.PathLike | None) -> str:
    """The Hub cache, from the argument or the environment as it is now."""
    if cache_dir is not None:
        return str(cache_dir)
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "huggingface"
    )
    return os.path.join(home, "hub")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "on", "yes", "true"}


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def no_connection(error: BaseException) -> str | None:
    """Why ``error``, raised while connecting (by socket.create_connection, or urllib's URLError around that),
    means that no connection can be made at all: no such host, refused, no route, a bad certificate; retrying in
    a few seconds would not help. None for anything else, a timeout included (a slow network is worth waiting for)."""
    reason = getattr(error, "reason", error)  # an HTTPError's is its status text: an answer, not a failed connection
    hopeless = isinstance(reason, (ConnectionRefusedError, socket.gaierror, ssl.SSLCertVerificationError)) or (
        isinstance(reason, OSError) and reason.errno in (errno.ENETUNREACH, errno.EHOSTUNREACH))
    if not hopeless:  # a timeout, a reset connection: worth another attempt
        return None
    return reason.strerror or str(reason) or type(reason).__name__


def unreachable(url: str) -> str | None:
    """Why the host of ``url`` cannot be reached at all (see :func:`no_connection`), or None: one connection, made
    before a download library would retry for half a minute. A host behind a proxy is left to the proxy."""
    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxied = (proxies.get(parts.scheme) or proxies.get("all")) and not urllib.request.proxy_bypass(parts.hostname or "")
    if not parts.hostname or proxied:
        return None
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as error:
        return no_connection(error)
    return None


def download(
    source: str,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    force_download: bool = False,
) -> Path:
    """Fetch a registry name or a Hub repository id (``org/name``) into the Hub cache.

    Returns the local folder (our format) or checkpoint file (third-party registry entries), after
    checking the weights' sha256. Works offline from the cache (``HF_HUB_OFFLINE=1``, or no network).
    A packaged model (``atst-frame-mini``) is the installed folder itself: no network, no cache.
    """
    entry = REGISTRY.get(source)
    if entry is not None and entry.packaged and revision is None:
        return packaged_folder(entry)
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id = entry.repo_id if entry else source
    revision = revision or (entry.revision if entry else None)
    filename = entry.filename if entry else WEIGHTS_NAME
    # A Hub that cannot be reached at all: the cache alone, at once (huggingface_hub would retry for half a minute).
    cut_off = None if offline() else unreachable(_endpoint() or "https://huggingface.co")
    options = dict(
        revision=revision,
        cache_dir=cache_dir_of(cache_dir),
        force_download=force_download,
        local_files_only=offline() or cut_off is not None,
        endpoint=_endpoint(),
        library_name="atst-features",
    )
    with _explained_hub_errors(source, repo_id, revision, entry, cut_off):
        if filename == WEIGHTS_NAME:
            folder = Path(snapshot_download(repo_id, allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME], **options))
            weights = folder / WEIGHTS_NAME
            if not weights.is_file() or not (folder / CONFIG_NAME).is_file():
                raise DownloadError(
                    f"{repo_id!r} has no {CONFIG_NAME} and {WEIGHTS_NAME}: it is not an atst-features model repository"
                )
            verify_sha256(weights, entry.sha256 if entry else None, f"{repo_id} at {revision or 'main'}")
            return folder
        path = Path(hf_hub_download(repo_id, filename, **options))
        verify_sha256(path, entry.sha256 if entry else None, f"{repo_id} at {revision or 'main'}")
        return path


def packaged_folder(entry: PretrainedModel) -> Path:
    """The folder of a model that ships inside the package, after checking its weights' sha256."""
    folder = PACKAGED_MODELS / entry.name
    weights = folder / WEIGHTS_NAME
    if not weights.is_file() or not (folder / CONFIG_NAME).is_file():
        raise DownloadError(f"{entry.name!r} should ship in the package at {str(folder)!r}, but its files are missing: "
                            "reinstall atst-features")
    verify_sha256(weights, entry.sha256, f"{entry.name}, packaged with atst-features", fix="reinstall atst-features")
    return folder


@contextmanager
def _explained_hub_errors(source: str, repo_id: str, revision: str | None, entry: PretrainedModel | None,
                          cut_off: str | None):
    """Turn huggingface_hub's exceptions into one-line errors that say what to do; ``cut_off``: why the Hub
    cannot be reached (see :func:`unreachable`), if it cannot."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r}" + (f" at revision {revision!r}" if revision else "")
    endpoint = _endpoint() or "https://huggingface.co"
    try:
        yield
    except (LocalEntryNotFoundError, ConnectionError, TimeoutError):
        reason = ("offline mode (HF_HUB_OFFLINE) is on" if offline()
                  else f"cannot reach {endpoint}" + (f" ({cut_off})" if cut_off else ""))
        raise DownloadError(
            f"cannot download {where}: {reason} and it is not in the cache {cache_dir_of(None)!r}; to work "
            "offline, load a model downloaded before (it is used from the cache, also with HF_HUB_OFFLINE=1), "
            "a local folder (load_model('path/to/folder')) or an official checkpoint file "
            f"(load_model('atstframe_base.ckpt')); {PACKAGED_HINT}"
        ) from None
    except GatedRepoError:
        raise DownloadError(f"{where} is gated or private: log in (huggingface-cli login) or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise DownloadError(f"{where}: no such revision (a branch, tag or commit of the repository)") from None
    except RepositoryNotFoundError:
        message = f"no Hub repository {repo_id!r} on {endpoint} (or it is private: set HF_TOKEN)"
        if entry is not None and entry.in_our_format:
            message += (
                f"; {source!r} may not be published yet: download the official checkpoint "
                f"({entry.source_url}) and load the file, or convert it with atst-convert; {PACKAGED_HINT}"
            )
        raise DownloadError(message) from None
    except EntryNotFoundError:
        raise DownloadError(f"{where} has no file {entry.filename if entry else WEIGHTS_NAME!r}") from None


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, commit_message: str | None = None) -> str:
    """Upload a folder in our format to a Hub repository (created if needed); returns the commit id."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file() or not (folder / WEIGHTS_NAME).is_file():
        raise InputError(f"{str(folder)!r} is not an atst-features model folder (no {CONFIG_NAME} / {WEIGHTS_NAME})")
    api = HfApi(endpoint=_endpoint())
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(
        repo_id=repo_id,
        folder_path=str(folder),
        allow_patterns=[CONFIG_NAME, WEIGHTS_NAME, CARD_NAME],
        commit_message=commit_message or "Upload ATST model converted with atst-features",
    )
    return getattr(info, "oid", None) or str(info)
