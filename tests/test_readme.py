"""The README's Python snippets run as printed (a GPU-only or multi-process snippet is
compiled only), and its relative links point at files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SNIPPETS = re.findall(r"```python\n(.*?)```", README, flags=re.DOTALL)


def _namespace() -> dict[str, object]:
    """What the snippets assume exists: a model and a loader of a few MNIST-sized batches."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(784, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
    )
    gen = torch.Generator().manual_seed(1)
    loader = [
        (torch.randn(16, 1, 28, 28, generator=gen), torch.randint(0, 10, (16,), generator=gen))
        for _ in range(3)
    ]
    return {"torch": torch, "F": torch.nn.functional, "model": model, "loader": loader}


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index: int) -> None:
    code = SNIPPETS[index]
    compiled = compile(code, f"README.md snippet {index}", "exec")
    if "cuda" in code or "init_process_group" in code:
        return  # needs a GPU or torchrun: compiled (syntax, names) but not run here
    namespace = _namespace()
    exec(compiled, namespace)
    model = namespace["model"]
    assert isinstance(model, torch.nn.Module)
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_readme_has_snippets_and_its_links_exist() -> None:
    assert len(SNIPPETS) >= 3
    for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):
        assert (ROOT / target).exists(), target


def test_benchmarks_readme_is_generated_from_the_results() -> None:
    """benchmarks/README.md equals what benchmarks/make_readme.py renders from results/."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "make_readme.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
