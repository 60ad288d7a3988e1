"""Run `sponge serve` as a subprocess: for end-to-end tests and the live benchmarks.

    with ServerProcess("--model", "m.onnx", "--batch", "4") as srv:   # a free loopback port, ready
        httpx.post(f"{srv.url}/v2/models/m/infer", ...)
        srv.admin("GET", "/admin/replicas")                           # bearer auth with srv.admin_token
    # stopped: SIGTERM to its own PID, SIGKILL after a grace period

    with ServerProcess(grpc=True) as srv:                             # gRPC too, on another free port
        tritonclient.grpc.InferenceServerClient(srv.grpc_url)         # "127.0.0.1:<srv.grpc_port>"

The server is started as `python -m sponge.cli serve` with the current interpreter, on 127.0.0.1 and a
port the OS just handed out (bound and released; if another process takes it in between, the start is
retried once on a new port). Its output goes to a log file (`log_path`) that is quoted whenever it fails
to start. Unless the arguments choose a policy, it runs `--policy static` (a fixed allocation: what a
test or a benchmark of the serving path wants; pass `default_policy=None` for serve's own default).
gRPC is off (`--grpc-port 0`: tests start many servers at once, none may take serve's default 8001)
unless `grpc=True` (a free port of its own, `grpc_port` / `grpc_url`) or the arguments give `--grpc-port`.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

ADMIN_TOKEN = "test-token"  # the default admin token: the server listens on loopback only
READY_TIMEOUT_S = 90.0  # the first start may build the ONNX model; a busy host makes it slower
STOP_GRACE_S = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on `host` a moment ago (bound to port 0, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `sponge serve` subprocess on a free loopback port, ready when the constructor returns.

    `args`: further `sponge serve` flags. `env`: added to this process's environment. The process is
    stopped by `stop()` (or leaving a `with` block): SIGTERM to its PID, SIGKILL if it has not exited
    after `STOP_GRACE_S`. Raises RuntimeError (with the server's log) if it exits or is not ready in time.
    """

    def __init__(self, *args: str, env: dict[str, str] | None = None, admin_token: str = ADMIN_TOKEN,
                 default_policy: str | None = "static", ready_timeout_s: float = READY_TIMEOUT_S,
                 log_level: str = "warning", grpc: bool = False) -> None:
        self.admin_token = admin_token
        self._grpc = grpc
        self._grpc_fixed: int | None = None  # a --grpc-port given in args
        if "--grpc-port" in args:
            self._grpc_fixed = int(args[list(args).index("--grpc-port") + 1])
        self._env = {**os.environ, **(env or {})}
        self._args = [*args]
        if default_policy is not None and "--policy" not in args:
            self._args += ["--policy", default_policy]
        if "--log-level" not in args:
            self._args += ["--log-level", log_level]
        self._log = None
        for attempt in range(2):
            self._start()
            try:
                self._wait_ready(ready_timeout_s)
                return
            except _PortTaken:
                if attempt == 1:
                    raise RuntimeError(f"server could not bind a free port twice: {self.log_path.read_text()}")

    def _start(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        grpc_args: list[str] = []
        if self._grpc_fixed is not None:
            self.grpc_port: int | None = self._grpc_fixed or None
        elif self._grpc:
            self.grpc_port = free_port()
            while self.grpc_port == self.port:
                self.grpc_port = free_port()
            grpc_args = ["--grpc-port", str(self.grpc_port)]
        else:
            self.grpc_port = None
            grpc_args = ["--grpc-port", "0"]
        self.grpc_url: str | None = None if self.grpc_port is None else f"127.0.0.1:{self.grpc_port}"
        self.log_path = Path(tempfile.gettempdir()) / f"sponge-server-{self.port}.log"
        # The token goes in a file only this user can read (as an operator should pass it), not in argv.
        self._token_path = Path(tempfile.gettempdir()) / f"sponge-server-{self.port}.token"
        fd = os.open(self._token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.admin_token + "\n")
        cmd = [sys.executable, "-m", "sponge.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
               "--admin-token-file", str(self._token_path), *grpc_args, *self._args]
        self._log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self._env)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._close_log()
                log = self.log_path.read_text()
                taken = [f"port {p} on 127.0.0.1 is in use" for p in (self.port, self.grpc_port) if p]
                if "address already in use" in log.lower() or any(s in log for s in taken):
                    raise _PortTaken()
                raise RuntimeError(f"server exited ({self.proc.returncode}): {log}")
            try:
                if httpx.get(f"{self.url}/v2/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server not ready in {timeout_s} s: {self.log_path.read_text()}")

    def admin(self, method: str, path: str, **kw: Any) -> httpx.Response:
        """A request to the operator API (`/admin/...`) with the bearer token."""
        return httpx.request(method, f"{self.url}{path}", headers={"Authorization": f"Bearer {self.admin_token}"},
                             timeout=30, **kw)

    def stop(self) -> None:
        """SIGTERM to the server's PID; SIGKILL if it is still running after the grace period. Idempotent."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None
        token_path = getattr(self, "_token_path", None)
        if token_path is not None:  # read by the server at start; not needed once it has exited
            token_path.unlink(missing_ok=True)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class _PortTaken(Exception):
    """The server exited because another process took its port first."""
