"""README.md stays true: its config reference is the one generated from the config dataclasses."""
from __future__ import annotations

import re
from pathlib import Path

from align.docs import config_reference

README = Path(__file__).resolve().parents[1] / "README.md"


def test_config_reference_matches_the_code():
    text = README.read_text()
    section = re.search(r"<!-- config-reference -->\n(.*?)<!-- /config-reference -->", text, re.S).group(1)
    assert section == config_reference(), "README config reference is stale: run `python -m align.docs`"


def test_every_config_key_has_a_meaning():
    missing = [ln for ln in config_reference().splitlines() if ln.startswith("| `") and ln.endswith("|  |")]
    assert not missing, missing
