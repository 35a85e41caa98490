"""The Python snippets of the README and of docs/ run as printed (a GPU-only or
multi-process snippet is compiled only); every relative link of the README, docs/ and
benchmarks/README.md points at a file that exists; every ``bigbatch.*`` name and every
repository file cited in the code's docstrings and comments exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "benchmarks/README.md"]
SNIPPETS = [
    snippet
    for page in PAGES
    for snippet in re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
]


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


def test_readme_is_short_and_its_links_and_the_docs_links_exist() -> None:
    assert len(SNIPPETS) >= 3
    assert len(README.encode()) < 15_000  # the details live in docs/
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:\s]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)}: {target}"


def test_names_and_files_cited_in_the_code_exist() -> None:
    import importlib

    sources = sorted((ROOT / "src").rglob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py"))
    missing = []
    for path in sources:
        text = path.read_text()
        for name in set(re.findall(r"\bbigbatch(?:\.[A-Za-z_][A-Za-z0-9_]*)+", text)):
            parts = name.split(".")
            obj: object = None
            for k in range(len(parts), 0, -1):  # the longest importable module, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:k]))
                except ImportError:
                    continue
                for attr in parts[k:]:
                    obj = getattr(obj, attr, None)
                break
            if obj is None:
                missing.append(f"{path.relative_to(ROOT)}: {name}")
        for cited in set(
            re.findall(
                r"\b((?:docs|tests|benchmarks|configs|examples)/[\w./-]+\.(?:md|py|toml|yaml|json))",
                text,
            )
        ):
            if not (ROOT / cited).exists():
                missing.append(f"{path.relative_to(ROOT)}: {cited}")
    assert not missing, missing


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
