"""Named models: one :class:`PretrainedModel` entry per name, data only.

An entry says where the weights live (a Hub repository pinned to a commit, the authors' own download,
or a folder inside this package), how to check them (sha256, size), what they are (kind, and a size of
:data:`~atst_features.encoder.ENCODER_SIZES`, from which widths, depths and embedding sizes follow),
and their licence and citation. A new named model is one entry in :data:`REGISTRY`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .encoder import EncoderConfig
from .errors import ModelNotFoundError
from .files import WEIGHTS_NAME
from .frontend import FrontendConfig
from .heads import HEADS, label_file

__all__ = ["ATST_CITATION", "ATST_SED_CITATION", "DEFAULT_MODEL", "HUB_ORGANISATION", "OFFLINE_MODEL", "PACKAGED_HINT",
           "REGISTRY", "PretrainedModel", "list_models", "official_entry"]

HUB_ORGANISATION = "atst-features"
DEFAULT_MODEL = "atst-frame-base"
OFFLINE_MODEL = "atst-frame-mini"  # ships in the package: works with no network
PACKAGED_HINT = (f"the small demo model {OFFLINE_MODEL!r} ships inside the package and works offline: "
                 f"load_model({OFFLINE_MODEL!r})")  # the commands name it as --model atst-frame-mini

ATST_CITATION = """@article{li2024atst,
  title   = {Self-supervised Audio Teacher-Student Transformer for Both Clip-level and Frame-level Tasks},
  author  = {Li, Xian and Shao, Nian and Li, Xiaofei},
  journal = {IEEE/ACM Transactions on Audio, Speech, and Language Processing},
  volume  = {32},
  year    = {2024},
  note    = {arXiv:2306.04186}
}"""

PRETRAINED_SED_CITATION = """@inproceedings{schmid2025pretrainedsed,
  title     = {Effective Pre-Training of Audio Transformers for Sound Event Detection},
  author    = {Schmid, Florian and Morocutti, Tobias and Foscarin, Francesco and Schl{\\"u}ter, Jan and Primus, Paul and Widmer, Gerhard},
  booktitle = {ICASSP},
  year      = {2025},
  note      = {arXiv:2409.09546}
}"""

ATST_SED_CITATION = """@inproceedings{shao2024atstsed,
  title     = {Fine-tune the pretrained ATST model for sound event detection},
  author    = {Shao, Nian and Li, Xian and Li, Xiaofei},
  booktitle = {ICASSP},
  year      = {2024},
  note      = {arXiv:2309.08153}
}"""


@dataclass(frozen=True)
class PretrainedModel:
    """One registry entry. ``size``: a key of :data:`~atst_features.encoder.ENCODER_SIZES`;
    ``filename`` is ``model.safetensors`` for repositories in our format, or the checkpoint file of a
    third-party repository; ``revision`` None means the default branch; ``packaged``: the model folder
    ships inside this package (``atst_features/models/<name>``); ``download_url``: the authors' own
    file, downloaded and converted while the entry is not ``published`` on the Hub (see
    :mod:`atst_features.official`). A fine-tuned model: ``head``, the kind of head (of
    :data:`~atst_features.heads.HEADS`) the file holds; ``labels_file``, its class names (a file of
    ``atst_features/data``), ``detection``, its post-processing, and ``frontend``, settings of its front
    end that differ from ATST's (a dB clamp), all given to the converted model."""

    name: str
    kind: str
    size: str
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
    head: str | None = None
    labels_file: str | None = None
    detection: dict = field(default_factory=dict)
    frontend: dict = field(default_factory=dict)

    @property
    def encoder(self) -> EncoderConfig:
        """The architecture of the entry's encoder (the official models have no prompt tokens)."""
        return EncoderConfig.of_size(self.size, cls_token=self.kind == "clip")

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    @property
    def depth(self) -> int:
        return self.encoder.depth

    def frame_embedding_size(self, n_blocks: int | None = None) -> int:
        """``n_blocks`` (default: all) times the width."""
        return self.encoder.frame_embedding_size(n_blocks or self.depth)

    def clip_embedding_size(self, n_blocks: int | None = None) -> int:
        """Size of the clip embedding with ``n_blocks`` (default: all); see
        :meth:`~atst_features.encoder.EncoderConfig.clip_embedding_size`."""
        return self.encoder.clip_embedding_size(n_blocks or self.depth)

    @property
    def labels(self) -> tuple[str, ...]:
        return label_file(self.labels_file) if self.labels_file else ()

    @property
    def outputs(self) -> str:
        """What the model gives, in a few words: embeddings, or its head's outputs and class count."""
        if self.head is None:
            return "embeddings"
        return f"{'events' if HEADS[self.head].level == 'frame' else 'tags'} ({len(self.labels)})"

    def config_overrides(self) -> dict:
        """What the converted model's config takes from this entry: class names, detection and front end settings."""
        overrides = {"labels": self.labels} if self.labels_file else {}
        if self.detection:
            overrides["detection"] = dict(self.detection)
        if self.frontend:
            overrides["frontend"] = FrontendConfig(**self.frontend)
        return overrides

    @property
    def published(self) -> bool:
        """On the Hub in our format, pinned to a commit (else the official download is used, if any)."""
        return self.revision is not None

    @property
    def in_our_format(self) -> bool:
        return self.filename == WEIGHTS_NAME

    def to_dict(self) -> dict:
        """The entry's fields with its width and depth, as ``atst-models --json`` prints them."""
        fields = dataclasses.asdict(self)
        position = list(fields).index("size") + 1
        items = list(fields.items())
        return dict(items[:position] + [("embed_dim", self.embed_dim), ("depth", self.depth)] + items[position:])


def _official(name: str, kind: str, size: str, source_url: str, description: str, download_url: str | None = None,
              license: str = "cc-by-4.0", **fields) -> PretrainedModel:
    """An entry converted from its authors' download (not yet on the Hub); ``fields``: head, labels, ..."""
    return PretrainedModel(
        name=name,
        kind=kind,
        size=size,
        repo_id=f"{HUB_ORGANISATION}/{name}",
        filename=WEIGHTS_NAME,
        revision=None,  # pinned to a commit once `atst-convert --push-to-hub` has published it
        sha256=None,
        num_bytes=None,
        license=license,
        source_url=source_url,
        description=description,
        download_url=download_url,
        **fields,
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
            head="clip",
            labels_file="audioset_labels",
        ),
        PretrainedModel(
            name="atst-frame-base-desed",
            kind="frame",
            size="base",
            repo_id="igonzf/ATST-SED",
            filename="model.pth",
            revision=None,
            sha256="295e9c10c4ce4d3106d5110ff51fea04ddb2173302bd5b3d546a6eef6cb119ae",
            num_bytes=346_657_710,
            license="unknown (third-party upload; ATST-SED code is MIT)",
            source_url="https://huggingface.co/igonzf/ATST-SED",
            description="ATST-SED's ATST-Frame encoder alone (embeddings; superseded by atst-sed-desed, the whole detector)",
            citation=ATST_SED_CITATION,
        ),
        _official(
            "atst-sed-desed",
            "frame",
            "base",
            "https://github.com/Audio-WestlakeU/ATST-SED",
            "ATST-SED (DCASE 2023 task 4), stage 2 without external data: ATST-Frame base, a CNN and a BiGRU, events "
            "of the 10 DESED classes every 64 ms",
            download_url="https://drive.google.com/uc?export=download&id=1yMv05N0Nz5mSzlQ4YBb_sqOjazPbPDhw",
            license="mit",
            citation=ATST_SED_CITATION,
            head="atst-sed",
            labels_file="desed",
            detection={"windows": "audio", "hop_seconds": 3.0, "threshold": 0.5, "combine": "union",
                       "median": {"Alarm_bell_ringing": 6, "Blender": 20, "Cat": 7, "Dishes": 4, "Dog": 7,
                                  "Electric_shaver_toothbrush": 6, "Frying": 6, "Running_water": 6, "Speech": 6,
                                  "Vacuum_cleaner": 6}},
            frontend={"clamp_db": [-50.0, 80.0]},
        ),
        _official(
            "atst-frame-base-as-strong-447",
            "frame",
            "base",
            "https://github.com/fschmid56/PretrainedSED",
            "ATST-Frame base fine-tuned on AudioSet-strong by PretrainedSED (Schmid et al., ICASSP 2025): frame-level "
            "probabilities of 447 classes every 40 ms",
            download_url="https://github.com/fschmid56/PretrainedSED/releases/download/v0.0.1/ATST-F_strong_1.pt",
            license="mit",
            citation=PRETRAINED_SED_CITATION,
            head="strong",
            labels_file="audioset_strong_447",
            detection={"windows": "audio", "hop_seconds": 10.0, "median": 9, "threshold": 0.5},
            frontend={"clamp_db": [-50.0, 80.0]},
        ),
        _official(
            "atst-frame-base-as-strong",
            "frame",
            "base",
            "https://github.com/Audio-WestlakeU/audiossl/issues/12",
            "ATST-Frame base fine-tuned on AudioSet-strong by the ATST authors: frame-level probabilities of 407 "
            "classes every 40 ms",
            download_url="https://drive.google.com/uc?export=download&id=1RWjnEnkDb-7fmNlqIcM-MovTnddOzLsh",
            head="strong",
            labels_file="audioset_strong_407",
            # their evaluation runs the spectrogram of the clip itself, unpadded (FreezingTransform)
            detection={"windows": "spectrogram", "hop_seconds": 10.0, "median": 7, "threshold": 0.5},
        ),
        _official(
            "atst-frame-base-as2m",
            "frame",
            "base",
            "https://github.com/Audio-WestlakeU/ATST-SED",
            "ATST-Frame base fine-tuned on AudioSet-2M by the ATST authors (atst_as2M.ckpt): tags of the 527 AudioSet "
            "classes",
            download_url="https://drive.google.com/uc?export=download&id=1_xb0_n3UNbUG_pH1vLHTviLfsaSfCzxz",
            head="clip",
            labels_file="audioset_labels",
        ),
        PretrainedModel(
            name=OFFLINE_MODEL,
            kind="frame",
            size="mini",
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


def official_entry(name: str) -> PretrainedModel:
    """The entry ``name`` if it has an official download, else :class:`ModelNotFoundError` listing those that do."""
    entry = REGISTRY.get(str(name))
    if entry is None or not entry.download_url:
        named = ", ".join(other for other, e in REGISTRY.items() if e.download_url)
        raise ModelNotFoundError(f"{str(name)!r} is not a registry model with an official download ({named})")
    return entry


def list_models() -> list[PretrainedModel]:
    """Every named model, in registry order (see :class:`PretrainedModel` for the fields)."""
    return list(REGISTRY.values())
