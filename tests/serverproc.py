"""Kept for the tests' imports: the launcher lives in the package (`sponge.server.process`), shared
with bench/."""

from sponge.server.process import ADMIN_TOKEN, ServerProcess, free_port

__all__ = ["ADMIN_TOKEN", "ServerProcess", "free_port"]
