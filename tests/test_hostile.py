"""Hostile model files: malformed configs and checkpoints fail in one CheckpointError line, early."""

from __future__ import annotations

import json
import tracemalloc
import warnings

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import atst_features
from atst_features import ATSTError, CheckpointError, load_model, save_pretrained
from atst_features.cli.embed import embed
from atst_features.cli.tools import convert
from atst_features.encoder import EncoderConfig
from atst_features.config import ModelConfig
from atst_features.model import ATSTModel


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    encoder = EncoderConfig(cls_token=False, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64, max_tokens=100)
    return save_pretrained(ATSTModel(ModelConfig("frame", encoder)), tmp_path_factory.mktemp("hostile") / "model")


def altered(folder, tmp_path, change) -> str:
    """A copy of ``folder`` whose config.json is ``change(config)`` (a dict, or any JSON text)."""
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    result = change(config)
    (copy / "config.json").write_text(result if isinstance(result, str) else json.dumps(result))
    return str(copy)


def encoder_value(key, value):
    def change(config):
        config["model"]["encoder"][key] = value
        return config
    return change


def model_value(key, value):
    def change(config):
        config["model"][key] = value
        return config
    return change


def frontend_value(key, value):
    def change(config):
        config["model"]["frontend"][key] = value
        return config
    return change


@pytest.mark.parametrize("change, message", [
    (lambda c: "[1, 2, 3]", "not an atst-features model config"),
    (lambda c: '"just a string"', "not an atst-features model config"),
    (lambda c: "[" * 100_000 + "]" * 100_000, "unreadable model config"),
    (encoder_value("depth", 1_000_000), r"EncoderConfig.depth must be in \[1, 64\], got 1000000"),
    (encoder_value("depth", 100_000_000), r"EncoderConfig.depth must be in \[1, 64\]"),
    (encoder_value("embed_dim", 1_000_000_000), r"EncoderConfig.embed_dim must be in \[1, 8192\]"),
    (encoder_value("num_heads", -4), r"EncoderConfig.num_heads must be in \[1, 256\]"),
    (encoder_value("n_mels", None), "EncoderConfig.n_mels must be int, got None"),
    (encoder_value("depth", True), "EncoderConfig.depth must be int, got True"),
    (encoder_value("max_tokens", [250]), "EncoderConfig.max_tokens must be int"),
    (lambda c: {**c, "model": {**c["model"], "frontend": {**c["model"]["frontend"], "sample_rate": 22050}}},
     r"FrontendConfig.sample_rate must be in \[16000, 16000\], got 22050"),  # every ATST model takes 16 kHz
    (lambda c: {**c, "format_version": "1"}, "format_version must be an integer"),
    (lambda c: {**c, "model": {**c["model"], "labels": "abc"}}, "labels must be a list of strings"),
    # every field's type, not only the encoder's: a folder that loads must embed
    (model_value("multi_label", "false"), "ModelConfig.multi_label must be bool, got 'false'"),
    (model_value("head_norm", 1), "ModelConfig.head_norm must be bool, got 1"),
    (model_value("head_type", ["clip"]), "ModelConfig.head_type must be str"),
    (model_value("kind", None), "ModelConfig.kind must be str, got None"),
    (model_value("num_classes", 2.0), "ModelConfig.num_classes must be int, got 2.0"),
    (model_value("frontend", "default"), "ModelConfig.frontend must be dict"),
    (model_value("tokenizer", {}), r"unknown model fields \['tokenizer'\]"),
    (encoder_value("window", 4), "EncoderConfig got an unexpected keyword argument 'window'"),
    (encoder_value("layer_norm_eps", 0.0), r"EncoderConfig.layer_norm_eps must be in \[1e-12, 1\], got 0.0"),
    (frontend_value("n_mels", 32), "the front end makes 32 mel bins, the encoder takes 64"),
    (frontend_value("hop_length", 100), "hop_length must be a whole number of milliseconds"),
    (lambda c: {**c, "provenance": "converted"}, "'provenance' and its 'hyper_parameters' must be objects"),
    (lambda c: {**c, "provenance": {"hyper_parameters": [1]}}, "'provenance' and its 'hyper_parameters' must be objects"),
])
def test_malformed_configs_fail_in_one_line_before_allocating(folder, tmp_path, change, message):
    source = altered(folder, tmp_path, change)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=message) as raised:
            load_model(source, device="cpu")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "\n" not in str(raised.value) and peak < 64 * 2**20


def checkpoint(tmp_path, state: dict, hyper: dict | None = None):
    path = tmp_path / "hostile.ckpt"
    torch.save({"state_dict": state, **({"hyper_parameters": hyper} if hyper is not None else {})}, path)
    return path


@pytest.fixture(scope="module")
def official_state(frame_small_ckpt):
    return torch.load(frame_small_ckpt, weights_only=True)["state_dict"]


@pytest.mark.parametrize("hyper, message", [
    ({"arch": ["small"], "num_heads": 6}, None),  # an odd arch is ignored: the shapes decide
    ({"n_mels": None}, r"hyper_parameters\['n_mels'\] must be int, got None"),
    ({"pos_type": 3}, r"hyper_parameters\['pos_type'\] must be str"),
    ({"num_heads": -4}, r"EncoderConfig.num_heads must be in \[1, 256\]"),
    ({"num_heads": 7}, "not divisible by num_heads 7"),
    ({"labels": {"a": 1}}, r"hyper_parameters\['labels'\] must be a list of names"),
])
def test_odd_hyperparameters(tmp_path, official_state, hyper, message):
    path = checkpoint(tmp_path, official_state, hyper)
    if message is None:
        assert load_model(path, device="cpu").depth == 12
        return
    with pytest.raises(CheckpointError, match=message):
        load_model(path, device="cpu")


def test_absurd_depth_from_key_names(tmp_path, official_state):
    state = dict(official_state)
    state["model.teacher.encoder.blocks.999999.norm1.weight"] = torch.ones(384)
    with pytest.raises(CheckpointError, match=r"EncoderConfig.depth must be in \[1, 64\], got 1000000"):
        load_model(checkpoint(tmp_path, state), device="cpu")


@pytest.mark.parametrize("dtype, value, message", [
    (torch.bool, True, "is torch.bool, not floating point"),
    (torch.complex64, 1 + 1j, "is torch.complex64, not floating point"),
    (torch.float32, float("nan"), "holds NaN or Inf values"),
    (torch.float32, float("inf"), "holds NaN or Inf values"),
])
def test_weights_must_be_finite_floats(tmp_path, official_state, dtype, value, message):
    state = dict(official_state)
    key = "model.teacher.encoder.blocks.3.mlp.fc2.bias"
    state[key] = torch.full_like(state[key], value, dtype=dtype)
    with pytest.raises(CheckpointError, match="'blocks.3.mlp.fc2.bias' " + message):
        load_model(checkpoint(tmp_path, state), device="cpu")


def test_cli_reports_damaged_weights_in_one_line(tmp_path, official_state):
    state = dict(official_state)
    state["model.teacher.encoder.pos_embed"] = state["model.teacher.encoder.pos_embed"].clone()
    state["model.teacher.encoder.pos_embed"][0, 3, 5] = float("nan")
    bad = checkpoint(tmp_path, state)
    audio = tmp_path / "a.wav"
    import soundfile

    soundfile.write(audio, np.zeros(8000, dtype=np.float32), 16000)
    for command, args in ((embed, [str(audio), "--model", str(bad)]), (convert, [str(bad), str(tmp_path / "out")])):
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 1 and "holds NaN or Inf values" in result.output and "Traceback" not in result.output
        assert len([line for line in result.output.splitlines() if "Error" in line]) == 1


def test_windows_follow_the_positional_table(folder):
    model = load_model(folder, device="cpu")  # 100 tokens: 4 s windows
    assert model.frame_window == 400 and model.clip_chunk == 400
    audio = np.random.default_rng(0).standard_normal(16000 * 9).astype(np.float32) * 0.1
    frames, _ = model.get_frame_embeddings(audio)  # 9 s: three windows (a 10 s window would not fit)
    assert frames.shape == (1, 225, 64) and torch.isfinite(frames).all()
    clip = model.get_clip_embedding(audio)
    assert clip.shape == (1, 64) and torch.isfinite(clip).all()


def test_every_error_is_in_the_family():
    from atst_features import AudioDecodeError, ChecksumError, DownloadError, EmptyAudioError, InputError

    for error in (AudioDecodeError, ChecksumError, DownloadError, EmptyAudioError, InputError, CheckpointError):
        assert issubclass(error, ATSTError)
    assert issubclass(DownloadError, OSError) and issubclass(CheckpointError, ValueError)


def test_an_internal_bug_keeps_its_traceback(tmp_path, folder, monkeypatch):
    import soundfile

    import atst_features.model

    audio = tmp_path / "a.wav"
    soundfile.write(audio, np.zeros(16000, dtype=np.float32), 16000)

    def broken(self, *args, **kwargs):
        raise KeyError("injected")

    monkeypatch.setattr(atst_features.model.ATSTModel, "get_clip_embedding", broken)
    result = CliRunner().invoke(embed, [str(audio), "--model", str(folder), "-q", "--num-workers", "0"])
    assert result.exit_code == 1
    assert "Traceback" in result.output and "KeyError: 'injected'" in result.output
    assert "this is a bug in atst-features" in result.output


def test_weight_dtypes_by_name_and_bad_ones_in_one_line(folder):
    from atst_features.errors import InputError

    for name, dtype in (("bfloat16", torch.bfloat16), ("torch.float16", torch.float16), ("fp32", torch.float32)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", atst_features.SlowPrecisionWarning)  # 16-bit on a CPU without fast kernels
            assert load_model(folder, device="cpu", dtype=name).dtype == dtype
    for bad in ("int8", torch.int8, "bfloat17"):  # torch printed its overloads of Tensor.to for a name
        with pytest.raises(InputError, match=rf"dtype {bad!r} is not a weight dtype: use torch.float32"):
            load_model(folder, device="cpu", dtype=bad)


def test_unavailable_devices_are_one_line(tmp_path, folder):
    from atst_features.errors import InputError

    with pytest.raises(InputError, match="is not a device name"):
        load_model(folder, device="gpu-please")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="'cuda' is not available here"):
            load_model(folder, device="cuda")
    if not torch.backends.mps.is_available():  # PyTorch raised RuntimeError: not linked with support for mps
        with pytest.raises(InputError, match=r"'mps' is not available here \(no Apple GPU"):
            load_model(folder, device="mps")
    if not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        with pytest.raises(InputError, match=r"'xpu' is not available here \(.+\); use cpu$"):
            load_model(folder, device="xpu")
    import soundfile

    soundfile.write(tmp_path / "a.wav", np.zeros(16000, dtype=np.float32), 16000)
    result = CliRunner().invoke(embed, [str(tmp_path / "a.wav"), "--model", str(folder), "--device", "gpu-please"])
    assert result.exit_code == 1 and "is not a device name" in result.output and "Traceback" not in result.output


def _user_mistakes():
    """(name, call) pairs: each call is a mistake a user can make in the library or in training."""
    from atst_features import hear
    from atst_features.frontend import FrontendConfig

    frame = ATSTModel(ModelConfig("frame", EncoderConfig(cls_token=False, embed_dim=32, depth=2, num_heads=2,
                                                         mlp_hidden_dim=64)))
    mistakes = [
        ("encoder size", lambda: EncoderConfig.of_size("huge", cls_token=False)),
        ("encoder heads", lambda: EncoderConfig(cls_token=False, embed_dim=30, num_heads=4)),
        ("layer norm epsilon 0", lambda: EncoderConfig(cls_token=False, layer_norm_eps=0.0)),
        ("front end", lambda: FrontendConfig(f_min=8000.0, f_max=100.0)),
        ("model kind", lambda: ModelConfig("frame", EncoderConfig(cls_token=True))),
        ("n_blocks", lambda: frame.get_frame_embeddings(np.zeros(1000, np.float32), n_blocks=3)),
        ("audio type", lambda: frame.get_clip_embedding({"samples": [0.0]})),
        ("audio dtype", lambda: frame.get_clip_embedding(np.zeros(1000, np.int16))),
        ("no head", lambda: frame.get_tag_logits(np.zeros(1000, np.float32))),
        ("HEAR audio", lambda: hear.get_scene_embeddings(np.zeros((1, 1000)), hear.HearModel(frame))),
    ]
    try:
        import lightning  # noqa: F401
    except ImportError:
        return mistakes
    from atst_features.training.augment import LabelMixup, Mixup
    from atst_features.training.sampling import BalancedSampler
    from atst_features.training.sed import SoundEventDetection

    return mistakes + [
        ("mixup memory", lambda: Mixup(0.4, 0)),
        ("label mixup", lambda: LabelMixup(0.5, 10, 100, ratio=2.0)),
        ("sampler weights", lambda: BalancedSampler(torch.zeros(4), num_replicas=1, rank=0)),
        ("SED mode", lambda: SoundEventDetection(init="atst-frame-mini", labels=["a"], mode="everything")),
        ("SED labels", lambda: SoundEventDetection(init="atst-frame-mini", labels=[])),
    ]


def test_user_mistakes_raise_members_of_the_family():
    """Each mistake is an ATSTError (so the commands print it as one error: line, not as a bug)."""
    for name, call in _user_mistakes():
        with pytest.raises(ATSTError) as caught:
            call()
        assert "\n" not in str(caught.value), name


def test_a_model_that_loads_embeds_even_its_shortest_input(tmp_path):
    """A front end whose hop is long next to its FFT: 100 samples still make one token, not an empty
    (NaN) clip embedding."""
    from atst_features.frontend import FrontendConfig

    encoder = EncoderConfig(cls_token=False, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64, max_tokens=50)
    config = ModelConfig("frame", encoder, FrontendConfig(n_fft=256, win_length=256, hop_length=320))
    model = load_model(save_pretrained(ATSTModel(config), tmp_path / "model"), device="cpu")
    assert model.min_samples == 960  # 3 hops: 4 frames, one token
    frames, timestamps = model.get_frame_embeddings(np.full(100, 0.1, np.float32))
    assert frames.shape == (1, 1, 64) and timestamps.tolist() == [[30.0]] and torch.isfinite(frames).all()
    assert torch.isfinite(model.get_clip_embedding(np.full(100, 0.1, np.float32))).all()


def test_a_large_tensor_the_model_does_not_have_is_never_read(tmp_path, folder):
    """The weights file's header is checked before any tensor is read: 256 MB more in the file cost no memory."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "config.json").write_text((folder / "config.json").read_text())
    state = load_file(str(folder / "model.safetensors"))
    save_file({**state, "encoder.unused": torch.ones(64, 2**20)}, str(copy / "model.safetensors"))
    script = (
        "import resource, sys\n"
        "from atst_features import CheckpointError, load_model\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        "    load_model(sys.argv[1], device='cpu')\n"
        "except CheckpointError as error:\n"
        "    print(error)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    result = subprocess.run([sys.executable, "-c", script, str(copy)], capture_output=True, text=True, check=True)
    message, grown_kib = result.stdout.splitlines()
    assert "unexpected ['encoder.unused']" in message
    assert int(grown_kib) < 32 * 1024  # KiB: far below the 256 MB tensor


@pytest.mark.parametrize("peak", [1e20, 3.0e38])
def test_extreme_but_finite_audio_embeds_to_finite_values(tmp_path, folder, peak):
    """Far beyond [-1, 1], up to float32's range: finite embeddings from the API and in the files
    atst-embed writes (a peak of 1e20 used to write NaN)."""
    import soundfile

    audio = np.random.default_rng(0).standard_normal(16000 * 3).astype(np.float32)
    audio = (audio / np.abs(audio).max() * peak).astype(np.float32)
    model = load_model(folder, device="cpu")
    clip, frames, _ = model.get_embeddings(audio)
    assert torch.isfinite(clip).all() and torch.isfinite(frames).all()
    soundfile.write(tmp_path / "loud.wav", audio, 16000, subtype="FLOAT")
    result = CliRunner().invoke(embed, [str(tmp_path / "loud.wav"), "--model", str(folder), "--level", "both", "-q"])
    assert result.exit_code == 0, result.output
    written = np.load(tmp_path / "loud.npz")
    assert np.isfinite(written["clip"]).all() and np.isfinite(written["frame"]).all()


def test_a_model_that_computes_non_finite_values_returns_and_writes_nothing(tmp_path, folder):
    """Finite weights too large to compute with (the final norm's at 3e38 overflow): a
    NonFiniteError, never an embedding; atst-embed fails each file in one line and writes nothing."""
    import soundfile

    from atst_features import NonFiniteError

    model = load_model(folder, device="cpu")
    model.encoder.norm.weight.data.fill_(3e38)
    model.encoder.norm.bias.data.fill_(3e38)
    with pytest.raises(NonFiniteError, match=r"NaN or Inf for audio\[0\] and 1 more \(of 2\): the weights") as raised:
        model.get_frame_embeddings([np.ones(8000, np.float32), np.ones(4000, np.float32)])
    assert raised.value.items == (0, 1)
    with pytest.raises(NonFiniteError, match="for this audio"):
        next(model.iter_frame_embeddings(np.ones(8000, np.float32)))  # the streaming path checks every piece
    damaged = save_pretrained(model, tmp_path / "damaged")
    for name in ("a.wav", "b.wav"):
        soundfile.write(tmp_path / name, np.full(8000, 0.1, np.float32), 16000)
    result = CliRunner().invoke(embed, [str(tmp_path / "a.wav"), str(tmp_path / "b.wav"), "--model", str(damaged), "-q"])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 2 and all("NaN or Inf" in line for line in lines)
    assert "a.wav" in lines[0] + lines[1] and "b.wav" in lines[0] + lines[1] and "Traceback" not in result.output
    assert not list(tmp_path.glob("*.npz"))


def test_only_the_files_that_give_nan_fail_and_the_others_of_their_batch_are_written(tmp_path, monkeypatch):
    """One clip whose outputs are NaN (here: made so for loud input) fails alone, in one line; the
    files batched with it are embedded (atst-embed) or tagged (atst-tag) as if it were not there."""
    import soundfile

    from atst_features.cli.tag import tag
    from atst_features.encoder import ATSTEncoder

    torch.manual_seed(0)
    encoder = EncoderConfig(cls_token=False, embed_dim=32, depth=2, num_heads=2, mlp_hidden_dim=64)
    folder = save_pretrained(ATSTModel(ModelConfig("frame", encoder, num_classes=2, labels=("a", "b"))), tmp_path / "m")
    rng = np.random.default_rng(0)
    for name, scale in (("q1.wav", 0.1), ("loud.wav", 1e5), ("q2.wav", 0.1)):
        soundfile.write(tmp_path / name, (scale * rng.standard_normal(24000)).astype(np.float32), 16000, subtype="FLOAT")
    quiet = {name: load_model(folder, device="cpu").get_clip_embedding(str(tmp_path / name))[0] for name in ("q1.wav", "q2.wav")}

    original = ATSTEncoder.forward

    def nan_for_loud_input(self, mel, n_tokens=None, n_blocks=1, token_mask=None):
        out = original(self, mel, n_tokens, n_blocks, token_mask)
        loud = mel.flatten(1).amax(dim=1) > 2.0  # normalised dB far above the official range's top (1)
        for tokens in out.tokens:
            tokens[loud] = float("nan")
        return out

    monkeypatch.setattr(ATSTEncoder, "forward", nan_for_loud_input)
    files = [str(tmp_path / name) for name in ("q1.wav", "loud.wav", "q2.wav")]
    result = CliRunner().invoke(embed, [*files, "--model", str(folder), "-d", str(tmp_path / "out"), "-q", "--num-workers", "0"])
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == 1 and len(lines) == 1 and "loud.wav" in lines[0] and "NaN or Inf for this file" in lines[0]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["q1.npz", "q2.npz"]
    for name, clip in quiet.items():
        assert torch.allclose(torch.from_numpy(np.load(tmp_path / "out" / name.replace(".wav", ".npz"))["clip"]), clip, atol=1e-5)

    result = CliRunner().invoke(tag, [*files, "--model", str(folder), "--format", "csv", "--per-window", "--num-workers", "0"])
    assert result.exit_code == 1 and "loud.wav" in result.output and "NaN or Inf for this file" in result.output
    tagged = {line.split(",")[0] for line in result.output.splitlines() if line.endswith(tuple("0123456789"))}
    assert tagged == {files[0], files[2]}
