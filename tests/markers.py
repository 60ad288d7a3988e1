"""Shared pytest markers.

`needs_data`: the test reads the paper's public traces (Twitter 2021-08 request rates, the Ghent 4G/LTE
bandwidth log, 5Gophers RTTs, the published YOLOv5 profiles). They are third-party files kept outside
the repository, in `../shared/data` beside the clone or wherever `$SPONGE_SHARED_DATA` points (their
sources are listed in README.md). A fresh clone has neither, and every such test skips with the one
reason below. Use it on tests, on parametrized cases (`pytest.param(..., marks=needs_data)`), and on
every test that uses a fixture reading the traces (marks on fixtures have no effect; such a fixture
also calls `require_data()`, so a test that forgets the mark skips instead of erroring).
"""

from __future__ import annotations

import os

import pytest

from sponge.workload.paths import ENV_DATA, repo_root, shared_data_dir

# What the tests read under the data directory (paths as in ../shared/data/README.md).
DATA_FILES = (
    "workload/twitter_2021_08/workload.tbz2",
    "workload/twitter_2018_04_25_sponge/workload_create.txt",
    "workload/twitter_2018_04_25_sponge/workload_delete.txt",
    "network/belgium_4g_lte/report_bus_0001.log",
    "network/5gophers/All-Carriers/01-Throughput/data.csv",
    "network/5gophers/All-Carriers/02-Round-Trip-Times/data.csv",
    "profiles",
)


def _looked_in() -> str:
    env = os.environ.get(ENV_DATA)
    if env:
        return f"${ENV_DATA}={env}"
    try:
        return str(repo_root().parent / "shared" / "data")
    except FileNotFoundError:
        return "../shared/data"


def _missing() -> list[str]:
    try:
        d = shared_data_dir()
    except FileNotFoundError:
        return ["the directory itself"]
    return [f for f in DATA_FILES if not (d / f).exists()]


MISSING = _missing()
HAVE_DATA = not MISSING

DATA_SKIP_REASON = (
    f"needs the paper's traces, not found in {_looked_in()}"
    + ("" if HAVE_DATA or MISSING == ["the directory itself"] else f" (missing: {', '.join(MISSING)})")
    + ": get the public Twitter 2021-08, Ghent 4G/LTE and 5Gophers traces (sources listed in README.md) into"
    f" ../shared/data beside the repository, or set {ENV_DATA} to their directory"
)

needs_data = pytest.mark.skipif(not HAVE_DATA, reason=DATA_SKIP_REASON)


def require_data() -> None:
    """Skip the running test (or fixture) with the same reason as `needs_data`."""
    if not HAVE_DATA:
        pytest.skip(DATA_SKIP_REASON)
