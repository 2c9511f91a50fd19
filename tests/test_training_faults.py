"""Training that survives faults, tried with real processes and real signals on a CPU: a run killed
(SIGKILL) or stopped (SIGTERM, SIGUSR1) and resumed ends with the weights of the uninterrupted run,
bit for bit; a kill while a checkpoint is written leaves the previous one to resume from; a damaged
newest checkpoint is skipped; a full disk is one line; SLURM is asked to requeue and the requeued job
resumes by itself. Faults are injected by tests/fault_injection.py."""

from __future__ import annotations

import csv
import os
import resource
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile
import torch
from conftest import write_two_classes

pytest.importorskip("lightning")

from atst_features.training.augment import LabelMixup, Mixup  # noqa: E402
from atst_features.training.checkpointing import newest_checkpoint  # noqa: E402
from atst_features.training.data import AudioCrops  # noqa: E402
from atst_features.training.sampling import ResumableSampler  # noqa: E402

TESTS = Path(__file__).parent
PRESETS = {
    "frame-tiny": ["frame", "--config", "frame-tiny", "--model.max_steps", "20"],
    "clip-tiny": ["clip", "--config", "clip-tiny", "--model.max_steps", "20"],
}


# ------------------------------------------------------------------------------------------ helpers
def atst_train(args: list[str], cwd: Path, env: dict | None = None, limit_bytes: int | None = None,
               timeout: int = 300) -> subprocess.CompletedProcess:
    script = shutil.which("atst-train") or pytest.skip("atst-train is not installed as a command")
    cwd.mkdir(parents=True, exist_ok=True)
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), **(env or {})}

    def limit_file_size() -> None:  # a disk that is full after limit_bytes
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run([script, *args, "--trainer.enable_progress_bar", "false"], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit_file_size if limit_bytes else None)


def inject(name: str, **arguments) -> list[str]:
    """Command-line arguments adding the callback ``fault_injection.NAME(**arguments)``."""
    return [f"--trainer.callbacks+=fault_injection.{name}",
            *(item for key, value in arguments.items() for item in (f"--trainer.callbacks.{key}", str(value)))]


def weights(path: Path) -> dict[str, torch.Tensor]:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    return {"global_step": checkpoint["global_step"], **checkpoint["state_dict"]}


def assert_same_weights(expected: Path, observed: Path) -> None:
    a, b = weights(expected), weights(observed)
    assert a["global_step"] == b["global_step"]
    assert a.keys() == b.keys()
    different = [key for key in a if key != "global_step" and not torch.equal(a[key], b[key])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def audio(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults-audio")
    rng = np.random.default_rng(0)
    for index in range(24):
        seconds = 1.5 + (index % 5) * 0.7
        soundfile.write(folder / f"{index:02d}.flac", (0.1 * rng.standard_normal(int(16000 * seconds))).astype("float32"), 16000)
    return folder


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Tones and noise, 1.5 s each: 16 train, 4 valid and 4 test clips per class; the manifest."""
    return write_two_classes(tmp_path_factory.mktemp("faults-labelled"), per_class=24) / "set.csv"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, audio) -> dict[str, Path]:
    """Each tiny pretraining preset run for 20 steps without interruption: its final checkpoint."""
    finals = {}
    for preset, args in PRESETS.items():
        root = tmp_path_factory.mktemp(f"uninterrupted-{preset}")
        result = atst_train([*args, "--data.path", str(audio)], root)
        assert result.returncode == 0, result.stderr[-3000:]
        finals[preset] = root / "runs" / preset / "checkpoints" / "last.ckpt"
    return finals


# ------------------------------------------------------------------------------------------ pretraining
@pytest.mark.slow
@pytest.mark.parametrize("preset", list(PRESETS))
def test_killed_and_resumed_pretraining_ends_as_the_uninterrupted_run(preset, uninterrupted, audio, tmp_path):
    """SIGKILL at step 13 (checkpoints every 10 steps: 3 steps lost), then --ckpt_path last."""
    args = [*PRESETS[preset], "--data.path", str(audio)]
    killed = atst_train([*args, *inject("KillAt", step=13)], tmp_path)
    assert killed.returncode == -signal.SIGKILL
    resumed = atst_train([*args, "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step=10.ckpt" in resumed.stderr
    assert_same_weights(uninterrupted[preset], tmp_path / "runs" / preset / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_a_kill_while_writing_a_checkpoint_leaves_the_previous_one(uninterrupted, audio, tmp_path):
    args = [*PRESETS["frame-tiny"], "--data.path", str(audio)]
    killed = atst_train([*args, *inject("KillWhileSaving", step=20)], tmp_path)
    assert killed.returncode == -signal.SIGKILL
    folder = tmp_path / "runs" / "frame-tiny" / "checkpoints"
    assert sorted(path.name for path in folder.glob("*.ckpt")) == ["epoch=1-step=10.ckpt", "last.ckpt"]
    assert (folder / "last.ckpt").resolve().name == "epoch=1-step=10.ckpt"
    assert [path.suffix for path in folder.glob(".atst-*")] == [".partial"]  # the half-written one, never a .ckpt
    resumed = atst_train([*args, "--ckpt_path", "last"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step=10.ckpt" in resumed.stderr.split("resuming from", 1)[1].splitlines()[0]
    assert not list(folder.glob(".atst-*"))  # the dead writer's temporary is swept by the next save
    assert_same_weights(uninterrupted["frame-tiny"], folder / "last.ckpt")


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_leaves_no_checkpoint(audio, tmp_path):
    result = atst_train([*PRESETS["frame-tiny"], "--data.path", str(audio)], tmp_path, limit_bytes=3_000_000)
    assert result.returncode == 1
    line = one_error_line(result.stderr)
    assert "cannot write" in line and "step=10.ckpt" in line and "disk full" in line and "dirpath" in line
    folder = tmp_path / "runs" / "frame-tiny" / "checkpoints"
    assert not list(folder.glob("*.ckpt")) and not list(folder.glob(".atst-*"))


# ------------------------------------------------------------------------------------------ signals and SLURM
@pytest.mark.slow
@pytest.mark.parametrize("signum, flags", [(signal.SIGUSR1, []), (signal.SIGTERM, ["--requeue"])], ids=["usr1", "term-requeue"])
def test_a_signal_under_slurm_saves_requeues_and_the_requeued_job_resumes(signum, flags, audio, tmp_path):
    """SIGUSR1 inside a SLURM job, or SIGTERM with --requeue, sent from outside as SLURM sends them."""
    bin_folder = tmp_path / "bin"
    bin_folder.mkdir()
    calls = tmp_path / "scontrol-calls"
    (bin_folder / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_folder / "scontrol").chmod(0o755)
    slurm = {"PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242"}
    args = [*PRESETS["frame-tiny"], "--data.path", str(audio), *flags]
    script = shutil.which("atst-train") or pytest.skip("atst-train is not installed as a command")
    process = subprocess.Popen([script, *args, "--model.max_steps", "2000", "--trainer.enable_progress_bar", "false"],
                               cwd=tmp_path, env={**os.environ, **slurm}, stderr=subprocess.PIPE, text=True)
    folder = tmp_path / "runs" / "frame-tiny" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(folder.glob("*step=20.ckpt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"{signal.Signals(signum).name}: stopped after step") and "preempted.ckpt" in last
    assert "requeued SLURM job 4242" in last and calls.read_text() == "requeue 4242\n"
    step = torch.load(folder / "preempted.ckpt", weights_only=True)["global_step"]
    assert 20 <= step < 2000
    # the requeued job: the same command; it resumes by itself (--requeue, or SLURM counting a restart)
    restarted = {} if flags else {"SLURM_RESTART_COUNT": "1"}
    requeued = atst_train([*args, "--model.max_steps", str(step + 3)], tmp_path, env={**slurm, **restarted})
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "resuming from" in requeued.stderr and "preempted.ckpt" in requeued.stderr
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == step + 3


@pytest.mark.slow
def test_sigterm_and_kills_in_fine_tuning_with_mixup_resume_exactly(labelled, tmp_path):
    args = ["finetune", "--config", "finetune-tiny", "--data.manifest", str(labelled), "--model.mixup", "true",
            "--model.max_epochs", "3"]  # 4 steps per epoch; a checkpoint at the end of each
    full = atst_train(args, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    expected = tmp_path / "full" / "runs" / "finetune-tiny" / "checkpoints" / "last.ckpt"
    # SIGTERM inside epoch 2 (after step 6): saved there, nothing lost
    stopped = atst_train([*args, *inject("KillAt", step=6, signum=int(signal.SIGTERM))], tmp_path / "term")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert stopped.stderr.strip().splitlines()[-1].startswith("SIGTERM: stopped after step 7; saved ")
    with open(next((tmp_path / "term" / "runs" / "finetune-tiny" / "csv").glob("*/metrics.csv")), newline="") as handle:
        logged = [int(row["step"]) for row in csv.DictReader(handle) if row.get("loss")]
    assert logged == list(range(7))  # the last step's metrics are written before the run stops
    resumed = atst_train([*args, "--ckpt_path", "last"], tmp_path / "term")
    assert resumed.returncode == 0 and "preempted.ckpt" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_weights(expected, tmp_path / "term" / "runs" / "finetune-tiny" / "checkpoints" / "last.ckpt")
    # SIGKILL after step 9: the end of epoch 2 (step 8) is the newest checkpoint
    killed = atst_train([*args, *inject("KillAt", step=9)], tmp_path / "kill")
    assert killed.returncode == -signal.SIGKILL
    resumed = atst_train([*args, "--ckpt_path", "last"], tmp_path / "kill")
    assert resumed.returncode == 0 and "latest-epoch=1-step=8.ckpt" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_weights(expected, tmp_path / "kill" / "runs" / "finetune-tiny" / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_sigterm_to_the_first_of_two_processes_stops_both_and_the_resumed_run_is_exact(audio, tmp_path):
    """DDP over two CPU processes (gloo): SIGTERM to rank 0 only; both stop after the same step, one line;
    resumed, the run ends with the uninterrupted run's weights (every process's generators and banks)."""
    args = ["frame", "--config", "frame-tiny", "--model.max_steps", "60", "--data.path", str(audio),
            "--trainer.devices", "2", "--trainer.strategy", "ddp"]
    full = atst_train(args, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    script = shutil.which("atst-train") or pytest.skip("atst-train is not installed as a command")
    run = tmp_path / "stopped"
    run.mkdir()
    process = subprocess.Popen([script, *args, "--trainer.enable_progress_bar", "false"], cwd=run,
                               stderr=subprocess.PIPE, text=True)
    folder = run / "runs" / "frame-tiny" / "checkpoints"
    deadline = time.monotonic() + 120
    while not list(folder.glob("*step=10.ckpt")) and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert len([line for line in stderr.splitlines() if line.startswith("SIGTERM: stopped after step")]) == 1
    checkpoint = torch.load(folder / "preempted.ckpt", weights_only=True)
    assert len(checkpoint["atst_processes"]) == 2 and 10 <= checkpoint["global_step"] < 60
    resumed = atst_train([*args, "--ckpt_path", "last"], run)
    assert resumed.returncode == 0 and "preempted.ckpt" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "full" / "runs" / "frame-tiny" / "checkpoints" / "last.ckpt", folder / "last.ckpt")


@pytest.mark.slow
def test_sigterm_inside_a_gradient_accumulation_stops_at_the_step_boundary(audio, tmp_path):
    """Two batches per optimizer step; the signal arrives with the first: the step's second batch is
    trained on before the save, and the resumed run ends as the uninterrupted one."""
    args = [*PRESETS["frame-tiny"], "--model.max_steps", "10", "--trainer.accumulate_grad_batches", "2",
            "--data.path", str(audio)]
    full = atst_train(args, tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    stopped = atst_train([*args, *inject("KillAt", step=5, signum=int(signal.SIGTERM))], tmp_path / "run")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "SIGTERM: stopped after step 6; saved " in stopped.stderr
    resumed = atst_train([*args, "--ckpt_path", "last"], tmp_path / "run")
    assert resumed.returncode == 0 and "preempted.ckpt" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "full" / "runs" / "frame-tiny" / "checkpoints" / "last.ckpt",
                        tmp_path / "run" / "runs" / "frame-tiny" / "checkpoints" / "last.ckpt")


# ------------------------------------------------------------------------------------------ pieces
def test_last_skips_a_damaged_newest_checkpoint(tmp_path, capsys):
    older, newer = tmp_path / "epoch=0-step=10.ckpt", tmp_path / "epoch=0-step=20.ckpt"
    torch.save({"global_step": 10, "state_dict": {"w": torch.ones(1000)}}, older)
    torch.save({"global_step": 20, "state_dict": {"w": torch.ones(1000)}}, newer)
    os.utime(older, (1, 1))
    assert newest_checkpoint(tmp_path) == newer.resolve()
    data = newer.read_bytes()
    newer.write_bytes(data[: len(data) // 2])  # cut short
    assert newest_checkpoint(tmp_path) == older.resolve()
    assert f"skipping checkpoint '{newer.resolve()}'" in capsys.readouterr().err
    damaged = bytearray(data)
    damaged[len(data) // 3] ^= 0xFF  # one flipped byte inside the tensor data: its checksum fails
    newer.write_bytes(bytes(damaged))
    assert newest_checkpoint(tmp_path) == older.resolve()
    assert newest_checkpoint(tmp_path / "nothing-here") is None


def test_a_resumed_sampler_yields_the_rest_of_the_epoch():
    whole = ResumableSampler(50, seed=3, draw_seeds=True)
    whole.set_epoch(4)
    expected = list(whole)
    resumed = ResumableSampler(50, seed=3, draw_seeds=True)
    resumed.resume(4, 20)
    assert list(resumed) == expected[20:]
    assert list(resumed) == expected  # only the first pass of the epoch is cut
    other_epoch = ResumableSampler(50, seed=3, draw_seeds=True)
    other_epoch.set_epoch(5)
    assert [index for index, _ in other_epoch] != [index for index, _ in expected]
    # in two processes, the same items with the same draw seeds as in one
    ranks = [ResumableSampler(50, num_replicas=2, rank=rank, seed=3, draw_seeds=True) for rank in range(2)]
    for sampler in ranks:
        sampler.set_epoch(4)
    assert sorted(item for sampler in ranks for item in sampler) == sorted(expected)


def test_a_crop_depends_on_its_draw_seed_only(tmp_path):
    soundfile.write(tmp_path / "long.wav", np.random.default_rng(0).standard_normal(16000 * 5).astype("float32") * 0.1, 16000)
    crops = AudioCrops([(tmp_path / "long.wav", None)], [1.0])
    torch.manual_seed(0)
    first = crops[0, 1234][0]
    torch.manual_seed(99)
    assert torch.equal(crops[0, 1234][0], first)
    assert not torch.equal(crops[0, 4321][0], first)


def test_memory_banks_round_trip_through_their_state():
    mixup = Mixup(0.4, memory=5)
    for batch in range(3):
        mixup(torch.randn(2, 4, 6) + batch)
    copy = Mixup(0.4, memory=5)
    copy.load_bank_state(mixup.bank_state(), "cpu")
    assert torch.equal(copy.contents(), mixup.contents()) and copy.position == mixup.position
    generator_a, generator_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 6)
    assert torch.equal(mixup(x, generator_a), copy(x, generator_b))

    labels = LabelMixup(memory=4, frames=6)
    labels(torch.randn(3, 4, 6), torch.eye(3), np.random.default_rng(0), torch.tensor([6, 5, 3]))
    restored = LabelMixup(memory=4, frames=6)
    restored.load_bank_state(labels.bank_state(), "cpu")
    x, y = torch.randn(2, 4, 6), torch.eye(3)[:2]
    mixed = labels(x, y, np.random.default_rng(7), torch.tensor([6, 4]))
    again = restored(x, y, np.random.default_rng(7), torch.tensor([6, 4]))
    assert all(torch.equal(a, b) for a, b in zip(mixed, again))
    assert labels.lengths == restored.lengths


@pytest.mark.slow
def test_unreadable_files_are_counted_at_the_end_of_each_epoch(audio, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(audio, data)
    (data / "broken-1.wav").write_bytes(b"RIFF but not audio")
    (data / "broken-2.flac").write_bytes(b"fLaC" + bytes(100))
    result = atst_train([*PRESETS["frame-tiny"], "--model.max_steps", "13", "--data.path", str(data)], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    # 26 files, 6 steps of 4 per epoch; a broken file is skipped for the next one (broken-1 -> broken-2 -> 00.flac)
    lines = [line for line in result.stderr.splitlines() if "read(s) of unreadable training files skipped" in line]
    counts = [int(line.split()[2]) for line in lines]
    assert lines and all(1 <= count <= 3 for count in counts), lines
    with open(next((tmp_path / "runs" / "frame-tiny" / "csv").glob("*/metrics.csv")), newline="") as handle:
        logged = [float(row["unreadable_files"]) for row in csv.DictReader(handle) if row.get("unreadable_files")]
    assert [count for count in logged if count] == counts


def test_inside_slurm_lightning_does_not_requeue_by_itself(monkeypatch):
    """Lightning's own SIGUSR1 handler saves from inside the handler, mid-step; atst-train turns it off."""
    import lightning as L

    from atst_features.training.cli import _without_lightning_requeue

    for name, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "job", "SLURM_JOB_ID": "77", "SLURM_NODELIST": "localhost",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(name, value)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    environment = trainer._accelerator_connector.cluster_environment
    assert type(environment).__name__ == "SLURMEnvironment" and environment.auto_requeue
    _without_lightning_requeue(trainer)
    assert not environment.auto_requeue


@pytest.mark.slow
def test_a_batch_job_log_gets_lines_not_a_progress_bar(audio, tmp_path):
    script = shutil.which("atst-train") or pytest.skip("atst-train is not installed as a command")
    result = subprocess.run([script, *PRESETS["frame-tiny"], "--model.max_steps", "7", "--data.path", str(audio)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)  # stderr: a pipe, as in a job's log
    assert result.returncode == 0, result.stderr[-3000:]
    assert "it/s" not in result.stderr and "\r" not in result.stderr
    assert "epoch 2, step 7/7: loss" in result.stderr  # ProgressLog's line at the end of an epoch
