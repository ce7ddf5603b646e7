"""Suite-wide test setup: the `slow` marker for everything that runs real processes or minutes of
training (`pytest -m "not slow"` is the edit-test loop; README's command runs all). Shared helpers
live in helpers.py."""

from __future__ import annotations

import pytest

# fixtures that start a real SuperLink with SuperNodes, or install a wheel and run the demo
SLOW_FIXTURES = {"federation", "secure", "installed", "warm_federation"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
