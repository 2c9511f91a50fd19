"""Read ATST checkpoints safely (``torch.load(weights_only=True)``) and infer their architecture.

Accepted: official Lightning checkpoints of ATST-Clip and ATST-Frame (encoder under
``model.teacher.encoder.``), the C2F distillation checkpoint (student under ``model.student.``,
AudioSet head under ``model.linear.``), the reference's fine-tuned checkpoints (``encoder.encoder.``,
head ``head.``), checkpoints of ``atst-train finetune`` (``model.encoder.``, head ``model.head.``,
label names in ``hyper_parameters``), the third-party layouts of ATST-SED
(``encoder.encoder.frame_encoder.``, ``atst_frame.atst.``), the legacy ``{"teacher": ..., "args": ...}``
dicts and bare encoder state dicts, all possibly behind ``module.`` / ``backbone.`` prefixes.
The architecture comes from ``hyper_parameters``
where present and otherwise from tensor shapes.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .encoder import ENCODER_SIZES, ATSTEncoder, EncoderConfig
from .errors import CheckpointError, InputError
from .heads import HEADS, head_of_weights
from .config import ModelConfig
from .model import ATSTModel

__all__ = [
    "CheckpointContents",
    "build_model",
    "check_state_dict",
    "check_tensors",
    "read_checkpoint",
    "parse_state_dict",
]

# Known places of the encoder, most specific first: the C2F student must win over the C2F file's
# ATST-Clip teacher, and a pretraining teacher over its student.
ENCODER_PREFIXES = (
    "sed_teacher.atst_frame.atst.",  # ATST-SED's Lightning checkpoint: the mean teacher, as its inference.py
    "model.student.",  # C2F distillation (FrameAST directly under the student)
    "model.teacher.encoder.",  # ATST-Clip / ATST-Frame pretraining (the EMA teacher)
    "encoder.encoder.frame_encoder.",  # ATST-SED
    "encoder.encoder.",  # fine-tuned ATST-Clip / ATST-Frame (the reference's FineTuningPLModule)
    "model.encoder.",  # fine-tuned by atst-train finetune
    "model.atst.",  # PretrainedSED's ATST-Frame (PredictionsWrapper(ATSTWrapper()), a plain state dict)
    "atst_frame.atst.",  # ATST-SED
    "encoder.",  # legacy {"teacher": ...} dicts
    "",  # bare encoder state dict
)
WRAPPER_PREFIXES = ("module.", "backbone.")
# Where a head (a kind of heads.HEADS) sits next to the encoder (the encoder's own weights aside), the
# prefix its names take in our modules, and whether weights there must be a head: PretrainedSED's
# "strong_head.weight" is a StrongHead's "linear.weight" (its weak_head is not used for strong
# predictions and is left out); ATST-SED's head stack sits beside its encoder, under the same model;
# a bare ATST-SED model file may hold other weights there, and then loads as its encoder alone.
HEAD_LAYOUTS = {"model.student.": ("model.linear.", "", True), "encoder.encoder.": ("head.", "", True),
                "model.encoder.": ("model.head.", "", True), "model.atst.": ("strong_head.", "linear.", True),
                "sed_teacher.atst_frame.atst.": ("sed_teacher.", "", True), "atst_frame.atst.": ("", "", False)}

# Globals that genuine files may hold besides tensors. The legacy pretraining format stores its
# command line as an argparse.Namespace (reference section 4.2), a plain attribute container.
SAFE_GLOBALS = [argparse.Namespace]

# Official key names -> ours (the CNN patch embedding is a reshaped Linear one).
_RENAMES = (
    (re.compile(r"^patch_embed\.patch_embed\."), "patch_embed."),
    (re.compile(r"^patch_embed\.proj\."), "patch_embed."),
    (re.compile(r"^norm_frame\."), "norm."),
)



@dataclass
class CheckpointContents:
    """What a checkpoint holds for inference: architecture, encoder weights, optional head."""

    config: ModelConfig
    encoder_state: dict[str, Tensor]
    head_state: dict[str, Tensor] | None
    layout: str
    hyper_parameters: dict


def _torch_file(path: Path) -> bool:
    """Whether ``path`` starts as ``torch.save`` files do: a zip archive, a pickle of protocol 2 or
    later (the legacy format), or a tar archive (the oldest one)."""
    with open(path, "rb") as handle:
        head = handle.read(262)
    return head.startswith((b"PK\x03\x04", b"\x80")) or head[257:262] == b"ustar"


def _torch_load(path: Path) -> object:
    # Text and audio files fail in the unpickler with messages about opcodes or "objects beyond
    # tensors", which would send the user looking for code in a CSV file.
    if not _torch_file(path):
        raise CheckpointError(f"{str(path)!r}: not a readable PyTorch checkpoint: neither a zip archive nor a pickle "
                              "(give an ATST checkpoint, a model folder or a registry name)")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f"the Python object {found.group(1)}" if found else "Python objects beyond tensors"
        raise CheckpointError(
            f"{str(path)!r}: refusing to unpickle {what}: checkpoints are read with "
            "torch.load(weights_only=True) and may only hold tensors and plain values"
        ) from None
    except Exception as err:  # noqa: BLE001 - any failure to parse untrusted bytes means "unreadable"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{str(path)!r}: not a readable PyTorch checkpoint (truncated or corrupted?): {reason}"
        ) from None


def _hyper_parameters(container: dict) -> dict:
    if isinstance(container.get("hyper_parameters"), dict):
        return dict(container["hyper_parameters"])
    args = container.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return {}


def _flat_state_dict(container: object) -> dict[str, Tensor] | None:
    """The tensor dict inside a loaded file, or None when there is none."""
    if not isinstance(container, dict):
        return None
    for key in ("state_dict", "teacher", "model"):
        inner = container.get(key)
        if isinstance(inner, dict) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return inner
    tensors = {k: v for k, v in container.items() if isinstance(k, str) and isinstance(v, Tensor)}
    return tensors or None


def check_tensors(state: dict[str, Tensor], name: str) -> None:
    """Weights must be finite floating-point tensors (BatchNorm's ``num_batches_tracked`` an integer):
    a ``CheckpointError`` names the first tensor that is not."""
    for key, tensor in state.items():
        if key.endswith("num_batches_tracked") and not tensor.is_floating_point() and not tensor.is_complex():
            continue
        if not tensor.is_floating_point():
            raise CheckpointError(f"{name}: tensor {key!r} is {tensor.dtype}, not floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{name}: tensor {key!r} holds NaN or Inf values; the weights are damaged")


def _strip_wrappers(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _find_encoder(state: dict[str, Tensor]) -> str | None:
    """The prefix under which an ATST encoder's keys sit."""
    candidates = {
        key[: -len("pos_embed")]
        for key in state
        if key.endswith("pos_embed") and key[: -len("pos_embed")] + "blocks.0.attn.qkv.weight" in state
    }
    for prefix in ENCODER_PREFIXES:
        if prefix in candidates:
            return prefix
    return candidates.pop() if len(candidates) == 1 else None


def _rename(key: str, value: Tensor) -> tuple[str, Tensor]:
    for pattern, replacement in _RENAMES:
        if pattern.match(key):
            if key == "patch_embed.proj.weight":  # Conv2d [D, 1, 64, 4] == Linear [D, 256]
                value = value.reshape(value.shape[0], -1)
            return pattern.sub(replacement, key), value
    return key, value


def _hyper(hyper: dict, key: str, default, kind: type, name: str):
    """A hyperparameter of the expected type (ints also from their float or string form), else CheckpointError."""
    value = hyper.get(key, default)
    if kind is int and isinstance(value, (str, float)) and re.fullmatch(r"\s*-?\d+(\.0*)?\s*", str(value)):
        value = int(float(value))  # 64, 64.0 and "64" are 64
    if isinstance(value, bool) or not isinstance(value, kind):
        raise CheckpointError(f"{name}: hyper_parameters[{key!r}] must be {kind.__name__}, got {value!r:.60}")
    return value


def _encoder_config(state: dict[str, Tensor], hyper: dict, name: str) -> EncoderConfig:
    pos_type = _hyper(hyper, "pos_type", "cut", str, name)
    if pos_type != "cut":
        raise CheckpointError(f"{name}: positional embedding type {pos_type!r} is not supported (only 'cut')")
    for key in ("pos_embed", "patch_embed.weight", "blocks.0.mlp.fc1.weight"):
        if key not in state:
            raise CheckpointError(f"{name}: the encoder has no {key!r} tensor")
    dim = int(state["pos_embed"].shape[-1])
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    patch_dim = int(state["patch_embed.weight"].shape[1])
    patch_h, patch_w = _hyper(hyper, "patch_h", 64, int, name), _hyper(hyper, "patch_w", 4, int, name)
    n_mels = _hyper(hyper, "n_mels", _hyper(hyper, "spec_h", 64, int, name), int, name)
    if (patch_h, patch_w, n_mels, patch_dim) != (64, 4, 64, 256):
        raise CheckpointError(
            f"{name}: patches of {patch_h} x {patch_w} over {n_mels} mel bins ({patch_dim} inputs per "
            "token) are not supported; ATST models use 64 x 4 patches over 64 mel bins"
        )
    arch = hyper.get("arch") if isinstance(hyper.get("arch"), str) else None
    arch = {"ast": "small"}.get(arch, arch)
    if isinstance(hyper.get("num_heads"), int):  # written by atst_features.training
        num_heads = hyper["num_heads"]
    elif arch in ENCODER_SIZES and ENCODER_SIZES[arch]["embed_dim"] == dim:
        num_heads = ENCODER_SIZES[arch]["num_heads"]
    else:
        num_heads = max(1, dim // 64)  # every official factory uses 64-dimensional heads
    prompts = state.get("prompt_embed")
    try:
        return EncoderConfig(
            cls_token="cls_token" in state,
            embed_dim=dim,
            depth=depth,
            num_heads=num_heads,
            mlp_hidden_dim=int(state["blocks.0.mlp.fc1.weight"].shape[0]),
            max_tokens=int(state["pos_embed"].shape[1]) - 1,
            n_prompts=0 if prompts is None else int(prompts.shape[1]),
        )
    except ValueError as err:
        raise CheckpointError(f"{name}: {err}") from None


def _expected_state(build) -> dict[str, Tensor]:
    """Key names and shapes of the state dict of the module ``build()`` makes, without allocating its weights."""
    with torch.device("meta"):
        return build().state_dict()


def check_state_dict(state: dict[str, Tensor | tuple], expected: dict[str, Tensor], name: str, where: str) -> None:
    """:class:`CheckpointError` naming ``name`` unless ``state`` (tensors, or only their shapes) has
    exactly the keys and shapes of ``expected``."""

    def shape(value) -> tuple:
        return tuple(value.shape) if isinstance(value, Tensor) else tuple(value)

    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {missing[:5]}" + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    if unexpected:
        problems.append(
            f"unexpected {unexpected[:5]}" + (f" and {len(unexpected) - 5} more" if len(unexpected) > 5 else "")
        )
    wrong = [f"{k} {shape(state[k])} != {shape(v)}" for k, v in expected.items() if k in state and shape(state[k]) != shape(v)]
    if wrong:
        problems.append(f"wrong shapes {wrong[:3]}")
    if problems:
        raise CheckpointError(
            f"{name}: the {where} does not match: " + "; ".join(problems)
            + f" (expected {len(expected)} keys such as {', '.join(repr(k) for k in list(expected)[:3])})"
        )


def parse_state_dict(
    state_dict: dict[str, Tensor], hyper_parameters: dict | None = None, name: str = "state dict"
) -> CheckpointContents:
    """Locate the encoder (and head) in a flat state dict and infer the model configuration."""
    hyper = dict(hyper_parameters or {})
    state = {_strip_wrappers(k): v for k, v in state_dict.items()}
    prefix = _find_encoder(state)
    if prefix is None:
        first = list(state_dict)[:5]
        raise CheckpointError(
            f"{name}: no ATST encoder found (first keys: {first}); expected an official checkpoint with "
            "'model.teacher.encoder.*' (ATST-Clip/Frame) or 'model.student.*' (C2F), or a bare encoder "
            "state dict with 'pos_embed', 'patch_embed.patch_embed.weight' and 'blocks.N.*'"
        )
    encoder_state = dict(_rename(k[len(prefix) :], v) for k, v in state.items() if k.startswith(prefix))
    if any(not isinstance(v, Tensor) for v in encoder_state.values()):
        raise CheckpointError(f"{name}: the encoder state holds values that are not tensors")
    for key in ("pos_embed", "patch_embed.weight", "blocks.0.mlp.fc1.weight"):
        if key in encoder_state and encoder_state[key].ndim != {"pos_embed": 3}.get(key, 2):
            raise CheckpointError(f"{name}: tensor {key!r} has shape {tuple(encoder_state[key].shape)}")
    config = _encoder_config(encoder_state, hyper, name)
    where = f"encoder under {prefix!r}" if prefix else "state dict"
    check_state_dict(encoder_state, _expected_state(lambda: ATSTEncoder(config)), name, where)

    # A C2F student: the official distillation layout, or one distilled by atst-train distill.
    distilled = prefix == "model.student." or (prefix == "model.encoder." and bool(hyper.get("teacher")))
    kind = "c2f" if distilled and not config.cls_token else "clip" if config.cls_token else "frame"
    head_state, num_classes, head_type, head_norm = None, 0, "clip", False
    head_prefix, ours, required = HEAD_LAYOUTS.get(prefix, (None, "", False))
    if head_prefix is not None:
        head_state = {ours + k[len(head_prefix) :]: v for k, v in state.items()
                      if k.startswith(head_prefix) and not k.startswith(prefix)} or None
    spec = None  # head_of_weights builds every kind of head (on the meta device): once per checkpoint
    if head_state is not None and not required:
        spec = head_of_weights(head_state, config)
        if spec is None:
            head_state = None
    if head_state is not None:
        if any(not isinstance(value, Tensor) for value in head_state.values()):
            raise CheckpointError(f"{name}: the head under {head_prefix!r} holds values that are not tensors")
        spec = spec or head_of_weights(head_state, config)
        if spec is None:
            kinds = "; ".join(f"{other}: {sorted(_expected_state(functools.partial(spec.new, config, 1)))[:4]}..."
                              for other, spec in HEADS.items())
            raise CheckpointError(f"{name}: the head under {head_prefix!r} has the weights {sorted(head_state)[:6]}, "
                                  f"those of no kind of head ({kinds})")
        head_type, num_classes, head_norm = spec.kind, spec.classes_in(head_state), spec.norm_in(head_state)
        check_state_dict(head_state, _expected_state(lambda: spec.new(config, num_classes, head_norm)), name, spec.title)
        check_tensors(head_state, name)
    check_tensors(encoder_state, name)
    labels = hyper.get("labels") or ()
    if not isinstance(labels, (list, tuple)) or not all(isinstance(label, str) for label in labels):
        raise CheckpointError(f"{name}: hyper_parameters['labels'] must be a list of names")
    if labels and len(labels) != num_classes:
        raise CheckpointError(f"{name}: {len(labels)} label names in hyper_parameters for a head of {num_classes} classes")
    try:
        model_config = ModelConfig(kind=kind, encoder=config, num_classes=num_classes, labels=tuple(labels),
                                   multi_label=bool(hyper.get("multi_label", True)), head_type=head_type,
                                   head_norm=head_norm)
    except InputError as error:
        raise CheckpointError(f"{name}: {error}") from None
    layout = f"{kind} encoder under {prefix!r}" if prefix else f"bare {kind} encoder"
    return CheckpointContents(model_config, encoder_state, head_state, layout, hyper)


def read_checkpoint(path: str | os.PathLike) -> CheckpointContents:
    """Read an ATST checkpoint file (see the module docstring for the accepted layouts)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r}: no such checkpoint file")
    container = _torch_load(path)
    state = _flat_state_dict(container)
    if state is None:
        raise CheckpointError(
            f"{str(path)!r}: holds no tensors; expected a Lightning checkpoint with a 'state_dict' or a bare "
            "encoder state dict"
        )
    return parse_state_dict(state, _hyper_parameters(container), name=repr(str(path)))


def _owned_float(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Floating tensors as float32, each in 64-byte-aligned memory of its own. Tensors read from a
    file can be views at any offset of one buffer (safetensors), and CPU matmul kernels round
    differently at other alignments: the same weights would then give outputs 1e-6 apart."""
    owned = {}
    for key, value in state.items():
        if value.is_floating_point():
            value = value.float()
            if value.data_ptr() % 64 or value.untyped_storage().nbytes() != value.nbytes:
                value = value.clone()
        owned[key] = value
    return owned


def build_model(contents: CheckpointContents) -> ATSTModel:
    """The model of parsed checkpoint contents (float32, CPU, eval mode)."""
    with torch.device("meta"):
        model = ATSTModel(contents.config)
    model.encoder.load_state_dict(_owned_float(contents.encoder_state), strict=True, assign=True)
    if model.head is not None:
        model.head.load_state_dict(_owned_float(contents.head_state), strict=True, assign=True)
    model.provenance = {"source_layout": contents.layout, "hyper_parameters": contents.hyper_parameters}
    return model.eval()
