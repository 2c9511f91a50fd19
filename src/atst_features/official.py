"""The authors' own downloads (Aliyun direct links, Google Drive) for registry models not yet on the Hub.

:func:`fetch_official` downloads the official checkpoint once (progress bar, resumed after an
interruption, Google Drive's "can't scan this file for viruses" page confirmed), converts it to our
folder format, checks the converted model's outputs against the checkpoint's, records the sha256
of both files and deletes the checkpoint. Every later load verifies the converted weights against
that record and makes no request (also offline). :func:`install_official` does the same with a file
downloaded by hand (Google Drive refuses files downloaded too often). The cache sits beside the Hub cache::

    <Hub cache>/../atst-features-official/<name>/download.json   url, file name, sizes, sha256s, date
    <Hub cache>/../atst-features-official/<name>/model/          config.json, model.safetensors, README.md
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from http.client import HTTPException
from http.cookiejar import CookieJar
from pathlib import Path

from filelock import FileLock
from tqdm import tqdm

from .convert import convert_checkpoint
from .errors import CheckpointError, ChecksumError, DownloadError
from .heads import HEADS
from .files import CONFIG_NAME, WEIGHTS_NAME, sha256_of, verify_sha256
from .hub import cache_dir_of, no_connection, offline
from .registry import PACKAGED_HINT, PretrainedModel

__all__ = ["fetch_official", "holds_model_of", "install_official", "official_folder"]

RECORD_NAME = "download.json"
MODEL_FOLDER = "model"
SOURCE_FOLDER = "source"  # the downloaded checkpoint, under the server's name, while it is converted
PARTIAL_NAME = "checkpoint.partial"
LOCK_NAME = ".lock"
LOCK_ATTEMPTS = 5  # _locked(): times a waiter locks anew after the holder removed the folder
CHUNK_BYTES = 1 << 20
MAX_BYTES = 8 << 30  # no ATST checkpoint is near this; a server sending more is refused
MAX_PAGE_BYTES = 1 << 20  # an HTML page (Drive's confirmation) is read up to this size
ATTEMPTS = 4  # per call; each one resumes where the previous stopped
TIMEOUT_S = 60


def official_folder(entry: PretrainedModel, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted official model of ``entry`` lives (beside the Hub cache)."""
    return Path(cache_dir_of(cache_dir)).parent / "atst-features-official" / entry.name


def fetch_official(
    entry: PretrainedModel, *, cache_dir: str | os.PathLike | None = None, force_download: bool = False
) -> Path:
    """The model folder of ``entry``, converted from its official download (see the module docstring).

    ``force_download``: download and convert again; a file that differs from the first download's
    sha256 is refused (:class:`ChecksumError`). Offline (``HF_HUB_OFFLINE=1``) only the cache is used.
    """
    if not entry.download_url:
        raise DownloadError(f"{entry.name!r} has no official download URL")
    home = official_folder(entry, cache_dir)
    if not force_download and _cached(home):
        return _verified(home)
    if offline():
        raise DownloadError(
            f"cannot download {entry.name!r}: offline mode (HF_HUB_OFFLINE) is on and it is not in the cache "
            f"{str(home)!r}; run once online, or load a checkpoint file or folder; {PACKAGED_HINT}"
        )
    with _locked(home):
        if not force_download and _cached(home):  # another process finished it while we waited
            return _verified(home)
        checkpoint, file_name = _download(entry.download_url, home, entry.name)
        return _convert(entry, home, checkpoint, file_name)


def install_official(entry: PretrainedModel, checkpoint: str | os.PathLike, *,
                     cache_dir: str | os.PathLike | None = None) -> Path:
    """Put ``checkpoint``, the official file of ``entry`` downloaded by hand, where a download of it
    goes: converted with the entry's settings (class names, post-processing, front end), checked, its
    sha256 recorded; later loads of the name use it. The file itself is left as it is. A file that
    differs from one installed or downloaded before is refused (:class:`ChecksumError`)."""
    home = official_folder(entry, cache_dir)
    with _locked(home):
        return _convert(entry, home, Path(checkpoint), Path(checkpoint).name, installed=True)


def holds_model_of(entry: PretrainedModel, origin: str, hint: str):
    """A ``check`` for :func:`~atst_features.convert.convert_checkpoint`: :class:`CheckpointError` unless
    the file (from ``origin``) holds ``entry``'s kind of model and head, naming the layouts expected."""

    def check(contents) -> None:
        config = contents.config
        held = config.head_type if config.num_classes else None
        if config.kind == entry.kind and held == entry.head:
            return
        has = f" with {_a(HEADS[held].title)} ({held})" if held else " with no head" if entry.head else ""
        wanted = f" with {_a(HEADS[entry.head].title)} ({entry.head})" if entry.head else ""
        expected = f", expected as {HEADS[entry.head].layouts}" if entry.head else ""
        raise CheckpointError(f"{origin}: holds an ATST-{config.kind} model{has}, not the {entry.kind} model{wanted} "
                              f"{entry.name!r} names{expected}; not used ({hint})")

    return check


@contextmanager
def _locked(home: Path):
    """Inside: ``home`` exists and this process holds its lock (one download or installation at a time). A
    failure that leaves ``home`` holding nothing but the lock removes both (and the folder of all official
    models, if empty): a failed first download leaves nothing behind. Waiters then lock a new file in a new folder."""
    for attempt in range(LOCK_ATTEMPTS):
        home.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(home / LOCK_NAME))
        try:
            lock.acquire()
            break
        except FileNotFoundError:  # the holder failed and removed the folder while this process waited
            if attempt == LOCK_ATTEMPTS - 1:
                raise
    try:
        yield
    except BaseException:
        if [path.name for path in home.iterdir()] == [LOCK_NAME]:
            with suppress(OSError):  # another process may have come in meanwhile: then it stays
                (home / LOCK_NAME).unlink()
                home.rmdir()
                home.parent.rmdir()
        raise
    finally:
        lock.release()


def _cached(home: Path) -> bool:
    return (home / RECORD_NAME).is_file() and (home / MODEL_FOLDER / CONFIG_NAME).is_file()


def _record(home: Path) -> dict:
    try:
        record = json.loads((home / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        raise ChecksumError(f"{str(home / RECORD_NAME)!r} is unreadable; delete {str(home)!r} to download again")
    return record


def _verified(home: Path) -> Path:
    """The cached model folder, after checking its weights against the sha256 recorded at download."""
    folder = home / MODEL_FOLDER
    verify_sha256(folder / WEIGHTS_NAME, _record(home).get("weights_sha256"), "converted official download",
                  fix="download it again with load_model(..., force_download=True)")
    return folder


def _convert(entry: PretrainedModel, home: Path, checkpoint: Path, file_name: str, installed: bool = False) -> Path:
    """Convert ``checkpoint``: downloaded (moved into the cache, deleted once converted), or a file
    the user ``installed`` (read where it is, kept)."""
    origin = str(checkpoint) if installed else entry.download_url
    source_sha256 = sha256_of(checkpoint)
    previous = _record(home) if (home / RECORD_NAME).is_file() else {}
    if previous.get("source_sha256") not in (None, source_sha256):
        if not installed:
            checkpoint.unlink()
        raise ChecksumError(
            f"{origin}: sha256 {source_sha256} differs from the first download's "
            f"{previous['source_sha256']} (recorded in {str(home / RECORD_NAME)!r}): the file was replaced or altered "
            f"on its way; not used. If you trust the new file, delete {str(home)!r} and load again"
        )
    # The server's file name (provenance) in a folder of its own: no name can clash with the cache's files.
    named = checkpoint if installed else home / SOURCE_FOLDER / file_name
    if not installed:
        named.parent.mkdir(exist_ok=True)
        checkpoint.replace(named)
    staging = home / f".{MODEL_FOLDER}.{os.getpid()}"
    try:
        done = convert_checkpoint(named, staging, license=entry.license, overwrite=True, source_sha256=source_sha256,
                                  provenance={"source_url": entry.download_url, "registry_name": entry.name},
                                  config_overrides=entry.config_overrides(),
                                  check=holds_model_of(entry, origin, "is it the right file?" if installed else "please report it"))
        if (home / MODEL_FOLDER).exists():
            shutil.rmtree(home / MODEL_FOLDER)
        staging.rename(home / MODEL_FOLDER)
    finally:
        if not installed:
            shutil.rmtree(named.parent, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    record = {
        "name": entry.name,
        "url": entry.download_url,
        "source_file": file_name,
        "source_bytes": done.source_bytes,
        "source_sha256": source_sha256,
        "weights_sha256": done.weights_sha256,
        "downloaded": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    written = home / f".{RECORD_NAME}.{os.getpid()}"
    written.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    written.replace(home / RECORD_NAME)
    return home / MODEL_FOLDER


def _a(words: str) -> str:
    return f"{'an' if words[:1].lower() in 'aeio' else 'a'} {words}"


# ------------------------------------------------------------------------------------------ HTTP
def _download(url: str, home: Path, name: str) -> tuple[Path, str]:
    """Fetch ``url`` into ``home/checkpoint.partial`` (resuming what an earlier attempt left);
    returns the complete file and the server's name for it."""
    partial = home / PARTIAL_NAME
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return partial, _fetch_once(opener, url, partial, name)
        except DownloadError:
            raise
        except (urllib.error.URLError, HTTPException, OSError) as err:
            if isinstance(err, urllib.error.HTTPError) and err.code < 500 and err.code not in (408, 429):
                raise DownloadError(f"cannot download {name!r} from {url}: HTTP {err.code} {err.reason}{_kept(partial)}"
                                    ) from None
            refused = no_connection(err) if isinstance(err, urllib.error.URLError) else None  # not worth retrying
            if attempt == ATTEMPTS or refused:
                reason = f"no connection to {urllib.parse.urlsplit(url).hostname} ({refused})" if refused else _reason(err)
                raise DownloadError(f"cannot download {name!r} from {url}: {reason}{_kept(partial)}; {PACKAGED_HINT}") from None
            time.sleep(min(2.0 * attempt, 10.0))
    raise AssertionError("unreachable")


def _reason(err: BaseException) -> str:
    reason = getattr(err, "reason", None) or err
    return str(reason).splitlines()[0][:200] or type(err).__name__


def _kept(partial: Path) -> str:
    """What a failed download says of the bytes it keeps for the next attempt; an empty file is removed."""
    kept = partial.stat().st_size if partial.exists() else 0
    if not kept:
        partial.unlink(missing_ok=True)
        return ""
    return f"; {kept:,} bytes are kept in {str(partial)!r} and the next attempt resumes from there"


def _fetch_once(opener, url: str, partial: Path, name: str) -> str:
    """One attempt: follow Drive's confirmation pages, then stream the file to ``partial``."""
    for _ in range(3):  # the file, or a confirmation page leading to it
        have = partial.stat().st_size if partial.exists() else 0
        headers = {"User-Agent": "atst-features", **({"Range": f"bytes={have}-"} if have else {})}
        try:
            response = opener.open(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
        except urllib.error.HTTPError as err:
            if err.code != 416 or not have:  # 416: the partial file is not a prefix of this one
                raise
            partial.unlink()
            continue
        with response:
            if response.headers.get_content_type() == "text/html":
                url = _confirmation_url(response.read(MAX_PAGE_BYTES).decode("utf-8", "replace"), response.url, url, name)
                continue
            resumed = response.status == 206 and response.headers.get("Content-Range", "").startswith(f"bytes {have}-")
            _stream(response, partial, have if resumed else 0, name)
            return _file_name(response, url)
    raise DownloadError(f"cannot download {name!r} from {url}: too many confirmation pages")


def _stream(response, partial: Path, start: int, name: str) -> None:
    length = response.headers.get("Content-Length")
    expected = start + int(length) if length and length.isdigit() else None
    with open(partial, "r+b" if start else "wb") as out, tqdm(
        total=expected, initial=start, unit="B", unit_scale=True, unit_divisor=1024, desc=name, disable=None
    ) as bar:
        out.seek(start)
        out.truncate()
        received = start
        while chunk := response.read(CHUNK_BYTES):
            received += len(chunk)
            if received > MAX_BYTES:
                raise DownloadError(f"{name!r}: the server sends more than {MAX_BYTES:,} bytes; not an ATST checkpoint")
            out.write(chunk)
            bar.update(len(chunk))
    if expected is not None and received < expected:
        raise HTTPException(f"connection closed after {received:,} of {expected:,} bytes")


_FORM = re.compile(r"<form\b[^>]*\baction=\"([^\"]+)\"[^>]*>(.*?)</form>", re.S | re.I)
_HIDDEN = re.compile(r"<input\b[^>]*\btype=\"hidden\"[^>]*>", re.I)
_ATTRIBUTE = re.compile(r"\b(name|value)=\"([^\"]*)\"", re.I)
_CONFIRM_LINK = re.compile(r"href=\"([^\"]*confirm=[^\"]*)\"", re.I)


def _confirmation_url(page: str, page_url: str, url: str, name: str) -> str:
    """Google Drive answers large files with a page asking to confirm ("can't scan this file for
    viruses"): a form of hidden fields (since 2024) or a link with a ``confirm=`` token (before)."""
    for action, body in _FORM.findall(page):
        fields = dict(_field(tag) for tag in _HIDDEN.findall(body))
        if "confirm" in fields or "id" in fields:
            target = urllib.parse.urljoin(page_url, html.unescape(action))
            return f"{target}?{urllib.parse.urlencode(fields)}"
    link = _CONFIRM_LINK.search(page)
    if link:
        return urllib.parse.urljoin(page_url, html.unescape(link.group(1)))
    title = re.search(r"<title>(.*?)</title>", page, re.S | re.I)
    raise DownloadError(
        f"{url} answered with a web page ({html.unescape(title.group(1)).strip()[:80] if title else 'no title'!r}), not "
        f"the file; Google Drive refuses files that were downloaded too often: try later, or download it in a "
        f"browser and install it as {name!r}: atst-convert path/to/file --as {name}"
    )


def _field(tag: str) -> tuple[str, str]:
    attributes = {key.lower(): html.unescape(value) for key, value in _ATTRIBUTE.findall(tag)}
    return attributes.get("name", ""), attributes.get("value", "")


def _file_name(response, url: str) -> str:
    """The server's name for the file (Content-Disposition, else the URL's last part), made safe."""
    disposition = response.headers.get("Content-Disposition", "")
    match = re.search(r"filename\*=UTF-8''([^;]+)", disposition) or re.search(r'filename="?([^";]+)"?', disposition)
    name = urllib.parse.unquote(match.group(1)) if match else urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1]
    name = re.sub(r"[^\w.-]", "_", name).lstrip(".")[:100]
    return name if name and name != PARTIAL_NAME else "checkpoint.ckpt"
