"""The README's configuration reference is the one the code generates."""

import re
from pathlib import Path

from colm_server.config import config_table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_config_table_is_generated_from_the_dataclasses():
    text = README.read_text()
    block = re.search(r"<!-- config-table.*?-->\n(.*?)\n<!-- /config-table -->", text, re.S)
    assert block, "README lacks the config-table markers"
    assert block.group(1) == config_table(), (
        "README's table is stale: replace it with colm_server.config.config_table()")
