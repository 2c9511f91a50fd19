"""Named models and the Hugging Face Hub: the registry, cached / offline / pinned downloads, integrity.

Every named checkpoint lives in :data:`REGISTRY` (Hub repository, pinned revision, file, sha256 of
the weights when known, sizes, licence, citation, official download). Models that ship inside the
package (``atst-frame-mini``) resolve to the installed files, with no network and no cache, after
the same sha256 check. Downloads go through
huggingface_hub and honour ``HF_ENDPOINT``, ``HF_HUB_OFFLINE``, ``HF_HOME`` / ``HF_HUB_CACHE`` and
tokens (``HF_TOKEN`` or ``huggingface-cli login``), read when the download happens. A weights file
whose sha256 differs from the registry's, or from the Hub's own LFS hash, is never used.
"""

from __future__ import annotations

import hashlib
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import ChecksumError, DownloadError, InputError
from .pretrained import ATST_CITATION, CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

__all__ = [
    "HUB_ORGANISATION",
    "DEFAULT_MODEL",
    "REGISTRY",
    "PretrainedModel",
    "download",
    "list_models",
    "push_to_hub",
    "sha256_of",
]

HUB_ORGANISATION = "atst-features"
DEFAULT_MODEL = "atst-frame-base"
OFFLINE_MODEL = "atst-frame-mini"  # ships in the package: works with no network
PACKAGED_HINT = f"{OFFLINE_MODEL!r} ships inside the package and needs no download"
PACKAGED_MODELS = Path(__file__).parent / "models"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

ATST_SED_CITATION = """@inproceedings{shao2024atstsed,
  title     = {Fine-tune the pretrained ATST model for sound event detection},
  author    = {Shao, Nian and Li, Xian and Li, Xiaofei},
  booktitle = {ICASSP},
  year      = {2024},
  note      = {arXiv:2309.08153}
}"""




@dataclass(frozen=True)
class PretrainedModel:
    """One registry entry. ``filename`` is ``model.safetensors`` for repositories in our format,
    or the checkpoint file of a third-party repository; ``revision`` None means the default branch;
    ``packaged``: the model folder ships inside this package (``atst_features/models/<name>``);
    ``download_url``: the authors' own file, downloaded and converted while the entry is not
    ``published`` on the Hub (see :mod:`atst_features.official`)."""

    name: str
    kind: str
    size: str
    embed_dim: int
    depth: int
    repo_id: str
    filename: str
    revision: str | None
    sha256: str | None
    num_bytes: int | None
    license: str
    source_url: str
    description: str
    citation: str = ATST_CITATION
    packaged: bool = False
    download_url: str | None = None

    @property
    def published(self) -> bool:
        """On the Hub in our format, pinned to a commit (else the official download is used, if any)."""
        return self.revision is not None

    def frame_embedding_size(self, n_blocks: int | None = None) -> int:
        """``n_blocks`` (default: all) times the width."""
        return (n_blocks or self.depth) * self.embed_dim

    def clip_embedding_size(self, n_blocks: int | None = None) -> int:
        return (2 if self.kind == "clip" else 1) * (n_blocks or self.depth) * self.embed_dim

    @property
    def in_our_format(self) -> bool:
        return self.filename == WEIGHTS_NAME


def _official(name: str, kind: str, size: str, source_url: str, description: str, download_url: str | None = None) -> PretrainedModel:
    dim = {"small": 384, "base": 768}[size]
    return PretrainedModel(
        name=name,
        kind=kind,
        size=size,
        embed_dim=dim,
        depth=12,
        repo_id=f"{HUB_ORGANISATION}/{name}",
        filename=WEIGHTS_NAME,
        revision=None,  # pinned to a commit once `atst-convert --push-to-hub` has published it
        sha256=None,
        num_bytes=None,
        license="cc-by-4.0",
        source_url=source_url,
        description=description,
        download_url=download_url,
    )


REGISTRY: dict[str, PretrainedModel] = {
    entry.name: entry
    for entry in (
        _official(
            "atst-clip-small",
            "clip",
            "small",
            "https://checkpointstorage.oss-cn-beijing.aliyuncs.com/atst/small.ckpt",
            "ATST-Clip small, self-supervised on AudioSet",
            download_url="https://checkpointstorage.oss-cn-beijing.aliyuncs.com/atst/small.ckpt",
        ),
        _official(
            "atst-clip-base",
            "clip",
            "base",
            "https://checkpointstorage.oss-cn-beijing.aliyuncs.com/atst/base.ckpt",
            "ATST-Clip base, self-supervised on AudioSet",
            download_url="https://checkpointstorage.oss-cn-beijing.aliyuncs.com/atst/base.ckpt",
        ),
        _official(
            "atst-frame-small",
            "frame",
            "small",
            "https://drive.google.com/file/d/1xZoOTuxV415icYONYbeFQzgrmJQf4a4B/view?usp=sharing",
            "ATST-Frame small, self-supervised on AudioSet",
            download_url="https://drive.google.com/uc?export=download&id=1xZoOTuxV415icYONYbeFQzgrmJQf4a4B",
        ),
        _official(
            "atst-frame-base",
            "frame",
            "base",
            "https://drive.google.com/file/d/1bGJSZWlAIIJ6GL5Id5dW0PTB72DL-QDQ/view?usp=sharing",
            "ATST-Frame base, self-supervised on AudioSet (the default model)",
            download_url="https://drive.google.com/uc?export=download&id=1bGJSZWlAIIJ6GL5Id5dW0PTB72DL-QDQ",
        ),
        _official(
            "atst-c2f-base",
            "c2f",
            "base",
            "https://github.com/Audio-WestlakeU/audiossl/tree/main/audiossl/methods/atstframe",
            "ATST-Frame base distilled from a fine-tuned ATST-Clip on AudioSet, with its 527-class head",
        ),
        PretrainedModel(
            name="atst-frame-base-desed",
            kind="frame",
            size="base",
            embed_dim=768,
            depth=12,
            repo_id="igonzf/ATST-SED",
            filename="model.pth",
            revision=None,
            sha256="295e9c10c4ce4d3106d5110ff51fea04ddb2173302bd5b3d546a6eef6cb119ae",
            num_bytes=346_657_710,
            license="unknown (third-party upload; ATST-SED code is MIT)",
            source_url="https://huggingface.co/igonzf/ATST-SED",
            description="ATST-Frame base fine-tuned for sound event detection on DESED (ATST-SED)",
            citation=ATST_SED_CITATION,
        ),
        PretrainedModel(
            name=OFFLINE_MODEL,
            kind="frame",
            size="mini",
            embed_dim=256,
            depth=6,
            repo_id=f"{HUB_ORGANISATION}/{OFFLINE_MODEL}",
            filename=WEIGHTS_NAME,
            revision=None,
            sha256="19cb4572611e7265421fb5f859660402f2bc8b3615ad2437739836f539438015",
            num_bytes=19_466_168,
            license="cc-by-sa-4.0",
            source_url="https://pypi.org/project/atst-features/",
            description="ATST-Frame mini (6 x 256), pretrained by atst-features on 7 h of openly licensed audio; "
            "ships in the package, works offline: a demo and test model",
            packaged=True,
        ),
    )
}


def list_models() -> list[PretrainedModel]:
    """Every named model, in registry order (see :class:`PretrainedModel` for the fields)."""
    return list(REGISTRY.values())


def looks_like_repo_id(source: str) -> bool:
    return bool(_REPO_ID.match(source))


def sha256_of(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


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


def verify_sha256(path: Path, expected: str | None, what: str,
            fix: str = "download it again with load_model(..., force_download=True)") -> None:
    """Check a downloaded file against an expected sha256 (the registry's, or the Hub's LFS hash,
    which names the cached blob)."""
    if expected is None:
        blob = path.resolve()
        expected = blob.name if _SHA256.match(blob.name) else None
    if expected is None:
        return
    actual = sha256_of(path)
    if actual != expected:
        raise ChecksumError(
            f"{str(path)!r} ({what}): sha256 {actual} is not the expected {expected}; the file is corrupted or "
            f"was changed: {fix}"
        )


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
    options = dict(
        revision=revision,
        cache_dir=cache_dir_of(cache_dir),
        force_download=force_download,
        local_files_only=offline(),
        endpoint=_endpoint(),
        library_name="atst-features",
    )
    with _explained_hub_errors(source, repo_id, revision, entry):
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
def _explained_hub_errors(source: str, repo_id: str, revision: str | None, entry: PretrainedModel | None):
    """Turn huggingface_hub's exceptions into one-line errors that say what to do."""
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
        reason = "offline mode (HF_HUB_OFFLINE) is on" if offline() else f"cannot reach {endpoint}"
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
