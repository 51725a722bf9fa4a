"""The README's handler example is code users copy: it must load and filter as it says."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from consumer.dispatch.loading import load_subscriptions
from consumer.settings import Settings
from tests.support import REPO


def test_readme_handler_example_loads(tmp_path: Path) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Handlers") :]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None
    (tmp_path / "myhooks.py").write_text(code.group(1))
    sys.path.insert(0, str(tmp_path))
    try:
        subs = load_subscriptions(["myhooks:publish", "myhooks:page"], Settings())
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("myhooks", None)
    publish, page = subs
    assert publish.phases == frozenset({"completed"}) and publish.types == frozenset({"upload"})
    assert publish.max_attempts == 10
    assert page.phases == frozenset({"failed"}) and page.previous == frozenset({"running"})
    assert page.where is not None
