"""README.md's Python examples run as written.

The convention, for whoever adds a section to README.md:
- Every block fenced ```python is a test: it runs here, on its own (a fresh namespace: import what it uses, define what
  it needs; nothing carries over from the blocks before it), in an empty temporary working directory, offline
  (HF_HUB_OFFLINE=1), and must finish in seconds on a CPU. Build small inputs in the block (an image from
  `palme_hf.synthetic_shapes`, `torch.rand(...)`) and load models from the shipped captioner
  (`palme_hf.cli.DEFAULT_CAPTIONER`) or from a small config, never from the network.
- A block that truly needs the network or a GPU (pushing to the Hub, `device_map` on GPUs) is fenced ```python no-run:
  shown, not run. Keep such blocks to the lines that need it.
- Blocks fenced otherwise (```bash, ```text, plain ```) are not run.
- A test fails with the block's heading and line in its id (`test_readme_block[Processing-L101]`), and the traceback
  points into the block. The block tests are marked slow (each builds or loads models): `make test` runs them,
  `pytest -m "not slow"` only checks that the fences parse.
"""

import os
import re

import pytest

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
FENCE = re.compile(r"^```(\S*)(?:[ \t]+(\S+))?[ \t]*$")


def readme_blocks() -> list[tuple[str, int, str]]:
    """(heading, first line number, code) of each ```python block of README.md that is not marked no-run."""
    blocks, heading, block, start, runnable = [], "top", None, 0, False
    with open(README, encoding="utf-8") as handle:
        lines = handle.read().splitlines()
    for number, line in enumerate(lines, start=1):
        fence = FENCE.match(line)
        if block is None:
            if line.startswith("#"):
                heading = line.lstrip("#").strip()
            if fence and line != "```":
                language, option = fence.groups()
                if option not in (None, "no-run"):
                    raise ValueError(f"README.md line {number}: unknown fence option {option!r} (only no-run).")
                block, start, runnable = [], number + 1, language == "python" and option is None
        elif line == "```":
            if runnable:
                blocks.append((heading, start, "\n".join(block) + "\n"))
            block = None
        else:
            block.append(line)
    if block is not None:
        raise ValueError(f"README.md: the block opened at line {start - 1} is never closed.")
    return blocks


BLOCKS = readme_blocks()


def test_the_readme_has_runnable_examples():
    assert len(BLOCKS) >= 8


@pytest.mark.slow
@pytest.mark.parametrize(
    "heading, start, code",
    BLOCKS,
    ids=[f"{re.sub(r'[^A-Za-z0-9]+', '-', heading).strip('-')[:40]}-L{start}" for heading, start, _ in BLOCKS],
)
def test_readme_block(heading, start, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    # line numbers of the traceback are README.md's
    program = compile("\n" * (start - 1) + code, README, "exec")
    exec(program, {"__name__": "__readme__"})
