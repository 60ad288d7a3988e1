"""Shared pytest markers."""

import pytest

from sponge.workload.paths import shared_data_dir

try:
    shared_data_dir()
    HAVE_DATA = True
except FileNotFoundError:
    HAVE_DATA = False

# Tests that read ../shared/data (CI has it beside the clone, like the developers' machines).
needs_data = pytest.mark.skipif(not HAVE_DATA, reason="shared traces not found")
