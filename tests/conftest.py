"""Shared pytest setup for the test suite.

The guard in tests/_guard.py makes any test fail that opens a file outside the repository (tests carry their
data in tests/fixtures/); importing its hooks here registers them for every test under tests/. Modules whose
small models run faster in one torch thread on a shared CPU use the `one_torch_thread` fixture.
"""

import pytest
import torch
from _guard import (  # noqa: F401  (pytest finds the hooks by name in this module)
    outside_repository,
    pytest_make_collect_report,
    pytest_runtest_call,
    pytest_runtest_setup,
    pytest_runtest_teardown,
)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests in one torch thread (restored after): on a CPU shared with other work, two threads
    that wait for each other at every op make small models many times slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
