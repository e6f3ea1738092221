"""A griffe extension for the API pages: `Example:` sections render as examples.

looproto's docstrings follow the Google convention `Example:` (singular, see the style
notes), which pytest runs as doctests. griffe's Google parser treats only the plural
`Examples:` as an examples section and renders the singular as an admonition of plain
Markdown, so `>>>` lines lose their code formatting and their output (`[...]`) is read
as link syntax. This renames the section title in the docstring text griffe parses;
the source is untouched.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_SINGULAR = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)


class ExampleSections(griffe.Extension):
    """Rewrites `Example:` section titles to `Examples:` before docstrings are parsed."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        docstring = obj.docstring
        if docstring is not None and "Example:" in docstring.value:
            docstring.value = _SINGULAR.sub(r"\1Examples:", docstring.value)
