"""The README's Use snippet runs as written (with a one-batch loader standing in for the user's)."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_use_snippet_runs_as_written(capsys):
    code = re.search(r"## Use\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    loader = [(torch.randn(2, 3, 32, 32), torch.tensor([1, 2]))]
    exec(compile(code, "README.md", "exec"), {"loader": loader})
    assert int(capsys.readouterr().out.strip()) > 0  # pulses were written
