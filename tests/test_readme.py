"""Every ```python block of README.md runs as written (in order, one namespace, in an empty folder, on the
embedded tiny models), so the front page's example cannot drift from the API."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)


def test_readme_python_blocks_run(tiny_dirs, tmp_path, monkeypatch, capsys):
    blocks = python_blocks(README.read_text())
    assert blocks, "README.md has no ```python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "__readme__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "trainable params:" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bo.safetensors", "bo_beach.png"]


def test_the_block_finder_finds_fenced_python_only():
    text = "x\n```python\na = 1\n```\n```bash\nls\n```\n```python\nb = 2\n```\n"
    assert python_blocks(text) == ["a = 1\n", "b = 2\n"]
