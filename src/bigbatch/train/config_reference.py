"""The reference of every configuration key, generated from the config classes themselves.

``python -m bigbatch.train.config_reference > docs/config.md`` writes it; a test checks that
the committed file is what this prints, so it cannot drift from the code. Each key's type,
default and the ``#:`` comment above its declaration in :mod:`bigbatch.train.config` are
listed, section by section. Not here: validation (the config classes do it).
"""

from __future__ import annotations

import inspect
import re
import sys
from typing import Any

from bigbatch.train.config import Config

__all__ = ["render"]


def _comments(cls: type) -> dict[str, str]:
    """``{field: the #: comment lines above it}`` from the class's source."""
    out: dict[str, str] = {}
    pending: list[str] = []
    for line in inspect.getsource(cls).splitlines():
        stripped = line.strip()
        if stripped.startswith("#:"):
            pending.append(stripped[2:].strip())
            continue
        match = re.match(r"(\w+)\s*:", stripped)
        if match and pending:
            out[match.group(1)] = " ".join(pending)
        pending = []
    return out


def _type_name(annotation: Any) -> str:
    text = str(annotation)
    if isinstance(annotation, type):
        text = annotation.__name__
    return text.replace("typing.", "").replace("|", "\\|")


def render() -> str:
    """The Markdown reference of every key (``section.key``: type, default, meaning)."""
    lines = [
        "# Configuration keys",
        "",
        "Every key of `bigbatch train|compare|sweep` (TOML/YAML files, flags, "
        "`--set section.key=value`), generated from `bigbatch.train.config` by "
        "`python -m bigbatch.train.config_reference > docs/config.md` (a test checks it "
        "is current).",
        "",
    ]
    defaults = Config()
    for section, field in Config.model_fields.items():
        model = field.annotation
        doc = inspect.getdoc(model) or ""
        lines += [f"## `{section}`", "", doc.splitlines()[0] if doc else "", ""]
        lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
        comments = _comments(model)  # type: ignore[arg-type]
        for name, sub in model.model_fields.items():  # type: ignore[union-attr]
            value = getattr(getattr(defaults, section), name)
            meaning = comments.get(name, "").replace("|", "\\|")
            lines.append(
                f"| `{section}.{name}` | `{_type_name(sub.annotation)}` | `{value!r}` | {meaning} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
