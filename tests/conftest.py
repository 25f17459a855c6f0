"""Shared pytest setup for the test suite.

The guard in tests/_guard.py makes any test fail that opens a file outside the repository (tests carry their
data in tests/fixtures/); importing its hooks here registers them for every test under tests/.
"""

from _guard import (  # noqa: F401  (pytest finds the hooks by name in this module)
    outside_repository,
    pytest_make_collect_report,
    pytest_runtest_call,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)
