"""MkDocs hooks: the ``atst-train`` reference from the package itself, and Sphinx roles in docstrings shown as code."""

from __future__ import annotations

import re

PRESETS_MARKER = "<!-- atst-train-presets -->"
USAGE_MARKER = "<!-- atst-train-usage -->"
# Docstrings cite code as Sphinx roles (:class:`ATSTModel`); the rendered page shows the code alone.
SPHINX_ROLE = re.compile(r":(?:attr|class|data|exc|func|meth|mod):(?=<code>)")


def on_page_markdown(markdown: str, **kwargs) -> str:
    """Replace the markers with ``atst-train``'s usage line and a table of its packaged presets."""
    if PRESETS_MARKER not in markdown and USAGE_MARKER not in markdown:
        return markdown
    from atst_features.training.cli import PRESETS, PRESETS_DIR, USAGE

    rows = ["| preset | what it is |", "|---|---|"]
    for name in PRESETS:
        first_line = (PRESETS_DIR / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        rows.append(f"| `{name}` | {first_line} |")
    markdown = markdown.replace(PRESETS_MARKER, "\n".join(rows))
    return markdown.replace(USAGE_MARKER, f"```\n{USAGE}\n```")


def on_page_content(html: str, **kwargs) -> str:
    """``:class:`X``` in a docstring renders as ``X`` in code type, without the role's name."""
    return SPHINX_ROLE.sub("", html)
