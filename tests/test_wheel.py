"""The built wheel works on its own: installed into a fresh virtual environment, run from an empty
folder, far from the checkout, the quickstart and the first command need nothing but the package."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent


def run(*args, cwd: Path, env: dict | None = None) -> str:
    env = dict(os.environ if env is None else env, PIP_NO_CACHE_DIR="1", PIP_DISABLE_PIP_VERSION_CHECK="1")  # pip: no ~/.cache
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_quickstart_from_the_installed_wheel(tmp_path):
    source, dist = tmp_path / "source", tmp_path / "dist"  # built from a copy: a build writes beside its sources
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    run(sys.executable, "-m", "pip", "wheel", source, "--no-deps", "--no-build-isolation", "-q", "-w", dist, cwd=tmp_path)
    (wheel,) = dist.glob("atst_features-*.whl")

    # A fresh venv whose dependencies (torch, soundfile, ...) come from this one by a .pth line, which
    # does not carry this environment's editable install of the checkout.
    venv = tmp_path / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])", cwd=tmp_path).strip())
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "-q", wheel, cwd=tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), HF_HOME=str(tmp_path / "hf"))
    where = run(python, "-c", "import atst_features; print(atst_features.__file__)", cwd=empty, env=env)
    assert Path(where.strip()).is_relative_to(site)

    out = run(python, ROOT / "examples" / "quickstart.py", cwd=empty, env=env)
    assert "clip embedding: (1, 1536)" in out
    assert "frame embeddings: (1, 263, 256) first timestamps (ms): [15.0, 55.0, 95.0]" in out

    example = run(python, "-c", "from atst_features import example_audio; print(example_audio())", cwd=empty, env=env).strip()
    assert Path(example).is_relative_to(site) and Path(example).with_name("LICENSE.md").is_file()
    run(venv / "bin" / "atst-embed", example, "--model", "atst-frame-mini", "--level", "both", "-o", empty / "speech.npz",
        cwd=empty, env=env)
    assert sorted(p.name for p in empty.iterdir()) == ["speech.npz"]
