"""The code in the documentation runs as written.

Every ```python block of the README and of ``docs/*.md`` runs offline: each page's blocks in order in
one namespace, in the test's temporary folder, with ``HF_HUB_OFFLINE=1`` and an empty Hub cache. A
block that needs downloads, a GPU or a dataset is marked on the line before it with
``<!-- no-test: the reason -->``; any other block that fails, fails the test. Shell blocks run only
when marked ``<!-- test: shell -->`` (most need downloads, datasets or minutes of training): line by
line in bash, without their ``pip install`` lines (the test environment is installed), with paths
under ``/tmp/`` moved into the test's folder; a comment ``# NAME.npz: key [dims], ...`` in such a
block is checked against the file it names.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
NO_TEST = re.compile(r"<!--\s*no-test:(.*?)-->")
SHELL_TEST = "<!-- test: shell -->"
FENCE = re.compile(r"^```(\w*)\s*$")
SLOW_PAGES = {"onnx.md"}  # exports a model to ONNX: about 30 s
NPZ_CLAIM = re.compile(r"^#\s*(\S+\.npz):\s*(.+)$", re.MULTILINE)
ARRAY_CLAIM = re.compile(r"(\w+) \[([\d, ]+)\]")


@dataclass
class Block:
    """A fenced code block: the line of its opening fence, its language, its code and the marker before it."""

    page: str
    line: int
    language: str
    code: str
    marker: str | None

    def __str__(self) -> str:
        return f"{self.page}, the {self.language} block at line {self.line}"


def code_blocks(text: str, page: str) -> list[Block]:
    """The fenced blocks of a Markdown text, each with the HTML comment on the line before its fence, if any."""
    lines = text.splitlines()
    blocks, index = [], 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if not opening:
            index += 1
            continue
        end = next((i for i in range(index + 1, len(lines)) if lines[i].startswith("```")), None)
        assert end is not None, f"{page}: the code block at line {index + 1} is never closed"
        before = lines[index - 1].strip() if index else ""
        marker = before if before.startswith("<!--") else None
        blocks.append(Block(page, index + 1, opening.group(1), "\n".join(lines[index + 1 : end]), marker))
        index = end + 1
    return blocks


def page_blocks(path: Path) -> list[Block]:
    return code_blocks(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())


def runnable_python(blocks: list[Block]) -> list[Block]:
    return [b for b in blocks if b.language == "python" and not (b.marker and NO_TEST.fullmatch(b.marker))]


def run_python(blocks: list[Block]) -> None:
    """Run the blocks in order in one namespace; a failing block fails with its page, line and the way out."""
    namespace: dict = {"__name__": "__docs__"}
    for block in blocks:
        try:
            exec(compile(block.code, f"<{block.page}:{block.line}>", "exec"), namespace)
        except Exception as error:
            raise AssertionError(
                f"{block} fails ({type(error).__name__}: {error}); make it run offline, or mark it on the line "
                "before with <!-- no-test: the reason -->"
            ) from error


@pytest.fixture
def offline_folder(tmp_path, monkeypatch) -> Path:
    """The test's folder as the working directory, the Hub offline and its cache empty."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path


def _pages_with_python() -> list:
    return [
        pytest.param(path, id=path.name, marks=[pytest.mark.slow] if path.name in SLOW_PAGES else [])
        for path in PAGES
        if runnable_python(page_blocks(path))
    ]


@pytest.mark.parametrize("path", _pages_with_python())
def test_python_blocks_run(path, offline_folder):
    run_python(runnable_python(page_blocks(path)))


def test_the_pages_with_code_are_found():
    readme = runnable_python(page_blocks(ROOT / "README.md"))
    assert any('load_model("atst-frame-mini")' in block.code for block in readme)
    assert {param.id for param in _pages_with_python()} >= {"README.md", "getting-started.md", "api.md", "hear.md"}


def test_a_block_neither_runnable_nor_marked_fails(offline_folder):
    page = (
        "# Page\n\n```python\nvalue = 41\n```\n\n<!-- no-test: needs the official weights -->\n"
        '```python\nfrom atst_features import load_model\nload_model("atst-frame-base")\n```\n\n'
        "```python\nvalue += 1\nassert value == 42\nload_model\n```\n"
    )
    blocks = runnable_python(code_blocks(page, "page.md"))
    assert [block.line for block in blocks] == [3, 13]  # the marked block is left out
    with pytest.raises(AssertionError, match=r"page\.md, the python block at line 13 fails \(NameError: .*no-test"):
        run_python(blocks)


@pytest.mark.parametrize("path", PAGES, ids=lambda path: path.name)
def test_markers_are_well_formed(path):
    text = path.read_text(encoding="utf-8")
    blocks = page_blocks(path)
    for block in blocks:
        if block.marker and block.marker.startswith("<!-- no-test"):
            match = NO_TEST.fullmatch(block.marker)
            assert match and match.group(1).strip(), f"{block}: a no-test marker says why: <!-- no-test: the reason -->"
            assert block.language == "python", f"{block}: no-test marks python blocks (shell blocks run only when marked)"
        if block.marker == SHELL_TEST:
            assert block.language == "bash", f"{block}: {SHELL_TEST} marks bash blocks"
    marker_lines = [line.strip() for line in text.splitlines() if line.strip() == SHELL_TEST or NO_TEST.fullmatch(line.strip())]
    marked = [block.marker for block in blocks if block.marker in marker_lines]
    assert len(marked) == len(marker_lines), f"{path.name}: a marker is not on the line right before a code block"


def shell_blocks() -> list:
    """The marked shell blocks, each code once (the README repeats the first commands of Getting started)."""
    unique: dict[str, Block] = {}
    for path in PAGES:
        for block in page_blocks(path):
            if block.marker == SHELL_TEST:
                unique.setdefault("\n".join(line for line in block.code.splitlines() if not is_pip_install(line)), block)
    return [pytest.param(block, id=f"{block.page}:{block.line}") for block in unique.values()]


def is_pip_install(line: str) -> bool:
    return line.lstrip().startswith("pip install")


def npz_claims(code: str) -> dict[str, dict[str, tuple[int, ...]]]:
    """``# speech.npz: clip [1536], frame [263, 1536]`` -> {"speech.npz": {"clip": (1536,), "frame": (263, 1536)}}."""
    return {
        name: {key: tuple(int(n) for n in dims.split(",")) for key, dims in ARRAY_CLAIM.findall(arrays)}
        for name, arrays in NPZ_CLAIM.findall(code)
    }


def test_npz_claims_are_read():
    claims = npz_claims("atst-embed x -o /tmp/a.npz\n# a.npz: clip [1536], frame [263, 1536], timestamps [263] (ms)\n")
    assert claims == {"a.npz": {"clip": (1536,), "frame": (263, 1536), "timestamps": (263,)}}


@pytest.mark.parametrize("block", shell_blocks())
def test_marked_shell_blocks_run(block, offline_folder):
    bin_dir = Path(sys.executable).parent
    if not shutil.which("atst-embed", path=str(bin_dir)):
        pytest.skip("the atst-* commands are not installed beside this Python")
    script = "\n".join(line for line in block.code.splitlines() if not is_pip_install(line))
    script = script.replace("/tmp/", f"{offline_folder}/")
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=offline_folder, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{block} fails:\n{result.stderr}"
    claims = npz_claims(block.code)
    for name, arrays in claims.items():
        with np.load(offline_folder / name) as saved:
            assert {key: saved[key].shape for key in arrays} == arrays, f"{block}: {name} is not as its comment says"
