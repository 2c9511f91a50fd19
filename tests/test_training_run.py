"""Pretraining for real, on a CPU: the tiny preset trains, its teacher is the EMA of its student,
resuming continues every schedule, the export loads; DDP over two processes; the data sources."""

from __future__ import annotations

import csv
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from click.testing import CliRunner
from conftest import waveform

L = pytest.importorskip("lightning")

from atst_features import load_model  # noqa: E402
from atst_features.cli.tools import convert  # noqa: E402
from atst_features.config import ModelConfig  # noqa: E402
from atst_features.model import ATSTModel  # noqa: E402
from atst_features.training import FramePretraining, PretrainingData  # noqa: E402
from atst_features.training.data import AudioCrops, ShardCrops  # noqa: E402

TINY = dict(arch="small", embed_dim=64, depth=2, num_heads=2, projector_hidden_dim=256, projector_out_dim=64,
            learning_rate=0.064, warmup_steps=5, max_steps=30, ema=0.99, mixup_memory=64)


@pytest.fixture(scope="module")
def audio_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("audio")
    for index in range(24):
        sub = folder / ("a" if index % 2 else "b")
        sub.mkdir(exist_ok=True)
        soundfile.write(sub / f"{index:02d}.flac", waveform(1.5 + (index % 5) * 0.7, index), 16000)
    return folder


class Recorder(L.pytorch.Callback):
    """Student parameters after every optimizer step and the momentum applied then; losses; schedules."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.stop_at = stop_at
        self.initial_teacher, self.updates, self.losses = None, [], []

    def on_train_start(self, trainer, module) -> None:
        self.initial_teacher = {k: v.detach().clone() for k, v in module.model.teacher.named_parameters()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        # after the optimizer step and its EMA update
        student = {k: v.detach().clone() for k, v in module.model.student.named_parameters()}
        self.updates.append((module.momentum_at(trainer.global_step), student))
        self.losses.append(float(outputs["loss"]))
        if self.stop_at is not None and trainer.global_step >= self.stop_at:
            trainer.should_stop = True


def fit(root: Path, data: Path, name: str, stop_at: int | None = None, ckpt_path: str | None = None):
    L.seed_everything(0, workers=True)
    module = FramePretraining(**TINY)
    datamodule = PretrainingData(str(data), crop_seconds=[2.0], batch_size=4, num_workers=0)
    recorder = Recorder(stop_at)
    trainer = L.Trainer(
        accelerator="cpu", max_steps=30, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        default_root_dir=root, logger=L.pytorch.loggers.CSVLogger(root, name=name),
        callbacks=[recorder, L.pytorch.callbacks.ModelCheckpoint(dirpath=root / name / "checkpoints",
                                                                 every_n_train_steps=5, save_last=True, save_top_k=-1)],
    )
    untrained = {k: v.detach().clone() for k, v in module.model.teacher.encoder.state_dict().items()}
    trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    return trainer, module, recorder, untrained


def schedule_log(trainer) -> dict[int, tuple[float, float, float]]:
    with open(Path(trainer.logger.log_dir) / "metrics.csv", newline="") as handle:
        return {int(row["step"]): (float(row["lr"]), float(row["wd"]), float(row["ema"]))
                for row in csv.DictReader(handle) if row.get("lr")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, audio_folder):
    root = tmp_path_factory.mktemp("run")
    return root, *fit(root, audio_folder, "full")


@pytest.mark.slow
def test_tiny_preset_trains(uninterrupted):
    root, trainer, module, recorder, _ = uninterrupted
    assert trainer.global_step == 30 and len(recorder.losses) == 30
    first, last = np.mean(recorder.losses[:5]), np.mean(recorder.losses[-5:])
    assert last < 0.8 * first, (first, last)
    # the peak learning rate is scaled by the global batch: 0.064 * 4 / 256
    assert module.learning_rate_at(4) == pytest.approx(0.064 * 4 / 256)


@pytest.mark.slow
def test_teacher_is_the_ema_of_the_student(uninterrupted):
    _, _, module, recorder, _ = uninterrupted
    expected = {k: v.clone() for k, v in recorder.initial_teacher.items()}
    for momentum, student in recorder.updates:
        for name, value in expected.items():
            value.mul_(momentum).add_(student[name], alpha=1 - momentum)
    for name, value in module.model.teacher.named_parameters():
        torch.testing.assert_close(value.detach(), expected[name], rtol=0, atol=1e-6)
    # after step k the momentum of index k + 1 applies (the reference's order); after the last step
    # the reference would index past its schedule, we keep its last value
    momenta = [momentum for momentum, _ in recorder.updates]
    assert momenta == [module.momentum_at(k + 1) for k in range(30)]
    assert momenta[0] == pytest.approx(0.99 + 0.01 * (1 - np.cos(np.pi / 30)) / 2)
    assert momenta[-1] == module.momentum_at(29) < 1.0


@pytest.mark.slow
def test_resume_continues_step_count_and_schedules(uninterrupted, tmp_path, audio_folder):
    _, full, _, _, _ = uninterrupted
    first, _, _, _ = fit(tmp_path, audio_folder, "part", stop_at=15)
    assert first.global_step == 15
    checkpoint = tmp_path / "part" / "checkpoints" / "epoch=2-step=15.ckpt"
    assert checkpoint.exists()
    resumed, _, recorder, _ = fit(tmp_path, audio_folder, "resumed", ckpt_path=str(checkpoint))
    assert resumed.global_step == 30 and len(recorder.updates) == 15
    expected = schedule_log(full)
    observed = {**schedule_log(first), **schedule_log(resumed)}
    assert sorted(observed) == list(range(30))
    for step in range(30):
        assert observed[step] == pytest.approx(expected[step], rel=1e-6), step


@pytest.mark.slow
def test_export_loads_and_differs_from_the_untrained_model(uninterrupted, tmp_path):
    root, _, module, _, untrained = uninterrupted
    out = tmp_path / "exported"
    result = CliRunner().invoke(convert, [str(root / "full" / "checkpoints" / "last.ckpt"), str(out)])
    assert result.exit_code == 0, result.output
    exported = load_model(out, device="cpu")
    assert exported.kind == "frame" and exported.embed_dim == 64 and exported.config.encoder.num_heads == 2
    audio = waveform(3.0, 99)
    trained = exported.get_frame_embeddings(audio, n_blocks=2)[0]
    with torch.device("meta"):
        baseline = ATSTModel(ModelConfig("frame", module.encoder_config))
    baseline.encoder.load_state_dict(untrained, assign=True)
    before = baseline.eval().get_frame_embeddings(audio, n_blocks=2)[0]
    assert trained.shape == before.shape == (1, 75, 128)
    assert (trained - before).abs().max() > 1e-2
    # and it is the trained teacher encoder, exactly
    teacher = {k: v for k, v in module.model.teacher.encoder.state_dict().items()}
    assert all(torch.equal(exported.encoder.state_dict()[k], v) for k, v in teacher.items())


def run_atst_train(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    script = shutil.which("atst-train") or pytest.skip("atst-train is not installed as a command")
    return subprocess.run([script, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_two_process_ddp_on_cpu(tmp_path, audio_folder):
    """The multi-GPU path, exercised here: DDP over two CPU processes (gloo)."""
    result = run_atst_train(["frame", "--config", "frame-tiny", "--data.path", str(audio_folder),
                             "--trainer.devices", "2", "--trainer.strategy", "ddp", "--model.max_steps", "6"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr and "Starting with 2 processes" in result.stderr
    checkpoint = torch.load(tmp_path / "runs/frame-tiny/checkpoints/last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6
    metrics = list(csv.DictReader(open(next((tmp_path / "runs/frame-tiny/csv").glob("*/metrics.csv")))))
    lrs = {int(r["step"]): float(r["lr"]) for r in metrics if r.get("lr")}
    assert lrs[1] == pytest.approx(0.064 * 8 / 256 / 4)  # global batch 2 x 4: peak 2e-3, warmup step 1 of 4


@pytest.mark.slow
def test_clip_preset_from_the_command_line(tmp_path, audio_folder):
    result = run_atst_train(["clip", "--config", "clip-tiny", "--data.path", str(audio_folder), "--model.max_steps", "4",
                             "--trainer.enable_progress_bar", "false"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "exported"
    assert CliRunner().invoke(convert, [str(tmp_path / "runs/clip-tiny/checkpoints/last.ckpt"), str(out)]).exit_code == 0
    model = load_model(out, device="cpu")
    assert model.kind == "clip" and model.depth == 2
    assert model.get_clip_embedding(waveform(2.0, 1), n_blocks=2).shape == (1, 2 * 2 * 64)  # CLS + mean per block


def test_a_presets_16_bit_precision_becomes_32_true_on_a_cpu_without_fast_kernels(tmp_path, audio_folder, monkeypatch,
                                                                                    capsys):
    import atst_features.precision as precision_module
    from atst_features.training.cli import main as train_main

    monkeypatch.setattr(precision_module, "cpu_multiplies_fast", lambda dtype: dtype == torch.float32)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bf16.yaml").write_text("trainer:\n  precision: bf16-mixed\n", encoding="utf-8")  # as frame-mini
    train_main(["frame", "--config", "frame-tiny", "--config", "bf16.yaml", "--data.path", str(audio_folder),
                "--model.max_steps", "1", "--trainer.enable_progress_bar", "false"])
    err = capsys.readouterr().err
    assert "note: --trainer.precision bf16-mixed: this CPU has no fast bfloat16 matrix kernels" in err
    assert "training in 32-true instead (the preset's bf16-mixed stays in force with --trainer.precision bf16-mixed)" in err
    saved = next(tmp_path.glob("runs/frame-tiny/**/config.yaml")).read_text(encoding="utf-8")
    assert "precision: 32-true" in saved


def test_cpu_precision_rule(monkeypatch, capsys):
    import atst_features.precision as precision_module
    from atst_features.training.cli import cpu_precision

    monkeypatch.setattr(precision_module, "cpu_multiplies_fast", lambda dtype: dtype == torch.float32)
    assert cpu_precision("16-mixed", "cpu", explicit=False) == "32-true"
    assert "no fast float16 matrix kernels" in capsys.readouterr().err
    assert cpu_precision("bf16-mixed", "cpu", explicit=True) == "bf16-mixed"  # asked for: kept, with a warning
    assert capsys.readouterr().err.startswith("warning: --trainer.precision bf16-mixed: this CPU has no fast bfloat16")
    assert cpu_precision("bf16-mixed", "gpu", explicit=False) == "bf16-mixed"
    assert cpu_precision("32-true", "cpu", explicit=False) == "32-true"
    monkeypatch.setattr(precision_module, "cpu_multiplies_fast", lambda dtype: True)
    assert cpu_precision("bf16-mixed", "cpu", explicit=False) == "bf16-mixed"
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_train_command_usage(tmp_path):
    assert run_atst_train([], tmp_path).returncode == 2
    listed = run_atst_train(["--list-presets"], tmp_path)
    assert listed.returncode == 0
    for name in ["clip-small", "clip-base", "frame-small", "frame-base", "clip-tiny", "frame-tiny"]:
        assert name in listed.stdout
    missing = run_atst_train(["frame", "--config", "frame-tiny"], tmp_path)
    assert missing.returncode != 0 and "data.path" in missing.stderr



def test_every_preset_parses(capsys):
    """A misspelt key or a value of the wrong type in any preset is an error before training starts."""
    from atst_features.training.cli import PRESETS, main

    required = {"clip": ["--data.path", "x"], "frame": ["--data.path", "x"], "finetune": ["--data.manifest", "x.csv"],
                "distill": ["--data.manifest", "x.csv", "--model.teacher", "t"], "sed": []}
    assert len(PRESETS) >= 26
    for name in PRESETS:
        method = name.split("-")[0]
        with pytest.raises(SystemExit) as stop:
            main([method, "--config", name, *required[method], "--print_config"])
        printed = capsys.readouterr()
        assert stop.value.code == 0, f"{name}: {printed.err[-500:]}"
        assert "\nmodel:" in printed.out and "\ndata:" in printed.out, name

# ------------------------------------------------------------------ data
def test_folder_crops_pad_short_clips(tmp_path):
    soundfile.write(tmp_path / "short.wav", np.full(8000, 0.5, np.float32), 16000)
    soundfile.write(tmp_path / "long.wav", waveform(5.0, 1), 16000)
    data = PretrainingData(str(tmp_path), crop_seconds=[2.0, 1.0], batch_size=2, num_workers=0)
    data.setup()
    items = {Path(path).name: index for index, (path, _) in enumerate(data.dataset.files)}
    short = data.dataset[items["short.wav"]]
    assert [len(crop) for crop in short] == [32000, 16000]
    assert torch.all(short[0][:8000] == 0.5) and torch.all(short[0][8000:] == 0)  # right-padded with zeros
    batch = next(iter(data.train_dataloader()))
    assert [tuple(crop.shape) for crop in batch] == [(2, 32000), (2, 16000)]


def test_manifest_with_durations_and_subset(tmp_path):
    for index in range(10):
        soundfile.write(tmp_path / f"{index}.wav", waveform(3.0, index), 16000)
    manifest = tmp_path / "train.csv"
    manifest.write_text("path,duration\n" + "".join(f"{i}.wav,3.0\n" for i in range(10)))
    first = PretrainingData(str(manifest), crop_seconds=[1.0], subset=4)
    first.setup()
    again = PretrainingData(str(manifest), crop_seconds=[1.0], subset=4)
    again.setup()
    assert len(first.dataset) == 4 and first.dataset.files == again.dataset.files  # the reference's seeded subset
    assert all(duration == 3.0 for _, duration in first.dataset.files)
    assert first.dataset[0][0].shape == (16000,)


def test_broken_training_file_is_skipped(tmp_path):
    (tmp_path / "bad.wav").write_text("not audio")
    soundfile.write(tmp_path / "good.wav", waveform(2.0, 1), 16000)
    dataset = AudioCrops([(tmp_path / "bad.wav", None), (tmp_path / "good.wav", None)], [1.0])
    with pytest.warns(UserWarning, match="skipping unreadable training file"):
        crops = dataset[0]
    assert crops[0].shape == (16000,)


def test_webdataset_shards(tmp_path):
    for shard in range(2):
        with tarfile.open(tmp_path / f"shard-{shard:06d}.tar", "w") as archive:
            for index in range(4):
                path = tmp_path / f"clip{shard}{index}.flac"
                soundfile.write(path, waveform(1.0 + index, shard * 10 + index), 16000)
                archive.add(path, arcname=f"{shard:02d}{index:02d}.flac")
    urls = str(tmp_path / "shard-{000000..000001}.tar")
    stream = iter(ShardCrops(urls, [2.0, 1.0], shuffle_buffer=4))
    samples = [next(stream) for _ in range(12)]  # sampled with replacement: an endless stream
    assert all([len(c) for c in crops] == [32000, 16000] for crops in samples)
    data = PretrainingData(urls, crop_seconds=[2.0], batch_size=3, num_workers=0)
    batch = next(iter(data.train_dataloader()))
    assert batch[0].shape == (3, 32000)


def quick_fit(data: Path, root: Path, **trainer_options):
    L.seed_everything(0, workers=True)
    module = FramePretraining(**TINY)
    datamodule = PretrainingData(str(data), crop_seconds=[2.0], batch_size=4, num_workers=0)
    options = dict(accelerator="cpu", max_steps=30, enable_progress_bar=False, enable_model_summary=False,
                   logger=False, enable_checkpointing=False, default_root_dir=root)
    trainer = L.Trainer(**{**options, **trainer_options})
    return trainer, module, datamodule


@pytest.mark.slow
def test_bf16_mixed_precision(tmp_path, audio_folder):
    trainer, module, data = quick_fit(audio_folder, tmp_path, precision="bf16-mixed", max_steps=3)
    seen = {}
    original = module.frontend.forward

    def spy(waveforms, n_samples=None):
        mel, frames = original(waveforms, n_samples)
        seen["mel"] = mel.dtype
        return mel, frames

    module.frontend.forward = spy
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3
    assert seen["mel"] == torch.float32  # the front end stays in float32 under autocast
    assert all(torch.isfinite(p).all() for p in module.model.teacher.parameters())


@pytest.mark.slow
def test_gradient_accumulation(tmp_path, audio_folder, monkeypatch):
    import atst_features.training.module as module_code

    calls = []
    original = module_code.ema_update
    monkeypatch.setattr(module_code, "ema_update", lambda *args: (calls.append(args[2]), original(*args)))
    trainer, module, data = quick_fit(audio_folder, tmp_path, accumulate_grad_batches=2, max_steps=3)
    trainer.fit(module, datamodule=data)
    assert trainer.global_step == 3 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6
    assert calls == [module.momentum_at(k) for k in (1, 2, 3)]  # one EMA update per optimizer step
    assert module.learning_rate_at(4) == pytest.approx(0.064 * 4 * 2 / 256)  # the global batch counts accumulation
