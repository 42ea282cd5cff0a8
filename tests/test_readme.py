"""The README's configuration table lists every SelectorConfig field with its default."""

import re
from dataclasses import fields
from pathlib import Path

from colm_server.select import SelectorConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_table_matches_selector_config():
    rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", README.read_text(), flags=re.M))
    defaults = SelectorConfig()
    for f in fields(SelectorConfig):
        assert f.name in rows, f"README lacks {f.name}"
        value = getattr(defaults, f.name)
        shown = rows[f.name].strip().strip("`")
        if isinstance(value, bool):
            assert shown == str(value).lower(), f.name
        elif isinstance(value, tuple):
            assert shown == "()", f.name
        else:
            assert shown == str(value), f.name
