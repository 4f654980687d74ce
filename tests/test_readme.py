"""The README's CPU examples run as written: every ```python block whose first line starts with `# CPU` is
executed (in a folder holding a `photo.jpg`) on the tiny demo checkpoint."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"


def cpu_blocks() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    return [block for block in blocks if block.startswith("# CPU")]


def test_the_readme_has_a_cpu_example_for_each_api():
    text = "\n".join(cpu_blocks())
    for api in ("AutoModel.from_pretrained", "LLM(", "AsyncLLM"):
        assert api in text
    code = "\n".join(line.split("#")[0] for line in text.splitlines())  # comments may name the GPU variant
    assert ".cuda()" not in code and "cuda" not in code


@pytest.mark.parametrize("block", cpu_blocks(), ids=lambda block: block.splitlines()[0][:40])
def test_a_cpu_example_runs(block, tmp_path, monkeypatch, capsys):
    Image.new("RGB", (640, 480), (200, 120, 40)).save(tmp_path / "photo.jpg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INTERNVL_ENGINE_CACHE", str(tmp_path / "cache"))  # the user's cache stays untouched
    exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})
    assert capsys.readouterr().out.strip()  # each example prints its answers
