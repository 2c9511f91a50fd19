"""ModelConfig: what an ATST model is (kind, encoder, front end, head), checked whole when it is made.

A model folder's ``config.json`` is untrusted input: :meth:`ModelConfig.from_dict` checks the type
of every field, and every config, however made, is checked for consistency, so a config that can be
made gives a model that embeds (the front end's mel bins are the encoder's, its hop a whole number
of milliseconds, the head a kind of :data:`~atst_features.heads.HEADS` with only the options it has).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .encoder import EncoderConfig
from .errors import InputError, check_field, check_fields
from .frontend import FrontendConfig
from .detection import check_settings
from .heads import HEADS

__all__ = ["MODEL_KINDS", "ModelConfig"]

MODEL_KINDS = ("frame", "clip", "c2f")


@dataclass(frozen=True)
class ModelConfig:
    """What an :class:`~atst_features.model.ATSTModel` is: its kind, encoder architecture, front end and head.

    ``kind``: ``"frame"`` (ATST-Frame), ``"clip"`` (ATST-Clip) or ``"c2f"`` (ATST-Frame distilled
    from ATST-Clip); ``num_classes``: outputs of the head (0: no head), a fine-tuned one or
    C2F's; ``labels``: their names (empty: unnamed); ``multi_label``: whether the head was trained
    with one sigmoid per class (probabilities by sigmoid) rather than a softmax; ``head_type``: a
    kind of :data:`~atst_features.heads.HEADS`, ``"clip"`` (a LinearHead on the clip embedding:
    tagging) or ``"events"`` (an EventHead on the last block's frames: sound event detection);
    ``head_norm``: the head standardises its input (an option of the event head); ``detection``: how
    a frame-level head detects events by default (windows of long audio, hop, median filter,
    threshold; see :mod:`atst_features.detection`).
    """

    kind: str
    encoder: EncoderConfig
    frontend: FrontendConfig = field(default_factory=FrontendConfig)
    num_classes: int = 0
    labels: tuple[str, ...] = ()
    multi_label: bool = True
    head_type: str = "clip"
    head_norm: bool = False
    detection: dict = field(default_factory=dict)

    # (field, type, lowest, highest) of the fields that are not configs themselves.
    RULES = (("kind", str, None, None), ("num_classes", int, 0, 100_000), ("multi_label", bool, None, None),
             ("head_type", str, None, None), ("head_norm", bool, None, None), ("detection", dict, None, None))

    def __post_init__(self) -> None:
        check_fields("ModelConfig", self, self.RULES)
        if not isinstance(self.encoder, EncoderConfig) or not isinstance(self.frontend, FrontendConfig):
            raise InputError("ModelConfig takes an EncoderConfig and a FrontendConfig")
        if self.kind not in MODEL_KINDS:
            raise InputError(f"kind must be one of {MODEL_KINDS}, got {self.kind!r}")
        if self.encoder.cls_token != (self.kind == "clip"):
            raise InputError(f"kind {self.kind!r} does not match the encoder (cls_token={self.encoder.cls_token})")
        if self.frontend.n_mels != self.encoder.n_mels:
            raise InputError(f"the front end makes {self.frontend.n_mels} mel bins, the encoder takes {self.encoder.n_mels}")
        if self.head_type not in HEADS:
            raise InputError(f"head_type must be one of {tuple(HEADS)}, got {self.head_type!r}")
        if self.head_norm and not HEADS[self.head_type].optional_norm:
            raise InputError(f"head_norm is an option of {[k for k, spec in HEADS.items() if spec.optional_norm]} heads, "
                             f"not of {self.head_type!r}")
        object.__setattr__(self, "labels", tuple(str(label) for label in self.labels))
        if self.labels and len(self.labels) != self.num_classes:
            raise InputError(f"{len(self.labels)} label names for a head of {self.num_classes} classes")
        check_settings(self.detection, self.labels)

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "encoder": self.encoder.to_dict(),
            "frontend": self.frontend.to_dict(),
            "num_classes": self.num_classes,
            "labels": list(self.labels),
            "multi_label": self.multi_label,
            "head_type": self.head_type,
            "head_norm": self.head_norm,
            "detection": dict(self.detection),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """The inverse of :meth:`to_dict`; :class:`InputError` for anything but its structure and types
        (a missing optional field takes its default)."""
        if not isinstance(data, dict) or "kind" not in data or "encoder" not in data:
            raise InputError("the model description must be an object with a 'kind' and an 'encoder' object")
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"unknown model fields {unknown[:5]}")
        for name in ("encoder", "frontend"):
            check_field("ModelConfig", name, data.get(name, {}), dict)
        labels = data.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise InputError("ModelConfig.labels must be a list of strings")
        try:
            encoder = EncoderConfig(**data["encoder"])
            frontend = FrontendConfig(**data.get("frontend", {}))
        except TypeError as error:  # a key the config does not have, or lacks
            raise InputError(str(error).replace(".__init__()", "")) from None
        scalars = {name: data[name] for name in ("kind", "num_classes", "multi_label", "head_type", "head_norm", "detection")
                   if name in data}
        return cls(encoder=encoder, frontend=frontend, labels=tuple(labels), **scalars)
