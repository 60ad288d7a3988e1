"""Start-up and client errors are one clear line on stderr, never a traceback: a model file that is not
ONNX (and no cgroup left behind), a port already taken (refused before any replica is spawned), and
`sponge classify` with no server to talk to."""

from __future__ import annotations

import glob
import socket
import subprocess
import sys
from pathlib import Path

from serverproc import free_port


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sponge.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(out: subprocess.CompletedProcess[str]) -> str:
    assert out.returncode != 0, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    return lines[0]


def sponge_cgroups_of(pid: int) -> list[str]:
    """Cgroup directories named after `pid` (`sponge-<pid>-<replica>`) under any Sponge parent (v1
    controllers or the v2 unified tree)."""
    found: list[str] = []
    for pattern in ("/sys/fs/cgroup/sponge*/sponge-{pid}-*", "/sys/fs/cgroup/*/sponge*/sponge-{pid}-*",
                    "/sys/fs/cgroup/*/*/sponge*/sponge-{pid}-*"):
        found += glob.glob(pattern.format(pid=pid))
    return found


def test_a_model_file_that_is_not_onnx_is_one_line_and_leaves_no_cgroup(tmp_path: Path):
    model = tmp_path / "notes.onnx"
    model.write_text("these are my notes, not a model\n")
    proc = subprocess.Popen([sys.executable, "-m", "sponge.cli", "serve", "--model", str(model), "--policy",
                             "static", "--port", str(free_port()), "--grpc-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout, stderr = proc.communicate(timeout=120)
    line = one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))
    assert line.startswith("sponge: error: --model:") and "is not an ONNX model" in line, line
    assert sponge_cgroups_of(proc.pid) == []


def test_a_taken_port_is_one_line_before_anything_is_spawned():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = run_cli("serve", "--host", "127.0.0.1", "--port", str(port), "--policy", "static")
        grpc_out = run_cli("serve", "--host", "127.0.0.1", "--port", str(free_port()), "--grpc-port", str(port),
                           "--policy", "static")
    assert out.returncode == 1
    assert one_line_error(out) == f"sponge: error: port {port} on 127.0.0.1 is in use"
    assert "terminate called" not in out.stderr
    assert grpc_out.returncode == 1
    assert one_line_error(grpc_out) == (f"sponge: error: gRPC port {port} on 127.0.0.1 is in use (--grpc-port N for "
                                        "another port, --grpc-port 0 to turn gRPC off)")


def test_classify_without_a_server_is_one_line():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    out = run_cli("classify", "sample:chelsea", "--url", url)
    assert out.returncode == 1
    assert one_line_error(out) == f"sponge: error: cannot reach {url}: connection refused"



def test_the_default_grpc_port_taken_turns_grpc_off_but_an_asked_for_one_is_an_error(caplog, monkeypatch):
    """8001 held by something else (another Triton, a second Sponge) must not stop `sponge serve` with its
    defaults: it serves HTTP only and says so. A gRPC port the user asked for stays a one-line error."""
    import pytest

    from sponge.config import ServerConfig
    from sponge.server import serve
    from sponge.server.serve import StartupError, grpc_port_to_use

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        real_check = serve.check_port_free
        # the default port (8001) is looked up as the port held here, whatever holds 8001 on this machine
        monkeypatch.setattr(serve, "check_port_free", lambda host, port, *a: real_check(
            host, taken if port == 8001 else port, *a))
        default = ServerConfig.load(None, {"host": "127.0.0.1"})
        assert default.grpc_port == 8001 and "grpc_port" not in default.model_fields_set
        with caplog.at_level("WARNING"):
            assert grpc_port_to_use(default).grpc_port == 0
        assert f"gRPC port {taken} on 127.0.0.1 is in use" in caplog.text and "serving HTTP only" in caplog.text
        asked = ServerConfig.load(None, {"host": "127.0.0.1", "grpc_port": taken})
        with pytest.raises(StartupError, match=f"gRPC port {taken} on 127.0.0.1 is in use"):
            grpc_port_to_use(asked)
    assert grpc_port_to_use(asked).grpc_port == taken  # free again: used as asked
