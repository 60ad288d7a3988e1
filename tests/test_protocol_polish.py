"""Protocol polish (issue 9, build item 5): V2 health bodies a stock client can read, `{"error": ...}` for
framework errors too, an OpenAPI document that says what each route answers, bounded admin inputs, the
admin token from the environment or a file, start-up checks (model file, port) that run before anything
is spawned or created."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from sponge.config import ConfigError, ServerConfig, resolve_admin_token
from sponge.server.admin import install_admin
from sponge.server.app import create_app
from sponge.server.scaler import NullActuator, ReplicaScaler
from sponge.server.serve import StartupError, check_onnx_file, check_port_free
from test_front_door_fixes import FakeReplica, make_core

TOKEN = "polish-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Replica(FakeReplica):
    busy = False

    def set_threads(self, threads: int) -> None:
        self.threads = threads


def build(max_batch: int = 16) -> tuple[Any, Any]:
    core = make_core(Replica())

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        core.start()
        try:
            yield
        finally:
            await core.close()

    app = create_app(core, max_body_bytes=1 << 20, default_slo_ms=1000.0, max_clock_skew_ms=200.0,
                     max_request_batch=8, lifespan=lifespan)
    install_admin(app, core, TOKEN, ReplicaScaler(core, {"r0": NullActuator(1000)}, 100, 2000), None,
                  max_batch=max_batch)
    return app, core


def asgi(coro_fn) -> Any:
    """Run `coro_fn(client, core)` against a fresh app, lifespan included."""
    async def main() -> Any:
        app, core = build()
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
                return await coro_fn(c, core)
    return asyncio.run(main())


# ---- 1. V2 health bodies ----------------------------------------------------------------------------
def test_health_endpoints_answer_the_v2_bodies_and_503_with_ready_false():
    async def check(c: httpx.AsyncClient, core: Any) -> None:
        r = await c.get("/v2/health/live")
        assert (r.status_code, r.json()) == (200, {"live": True})
        assert r.headers["content-type"] == "application/json"
        r = await c.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (200, {"ready": True})
        r = await c.get("/v2/models/m/ready")
        assert (r.status_code, r.json()) == (200, {"name": "m", "ready": True})
        core.replicas[0].kill()  # no replica can serve
        r = await c.get("/v2/health/ready")
        assert (r.status_code, r.json()) == (503, {"ready": False})
        r = await c.get("/v2/models/m/ready")
        assert (r.status_code, r.json()) == (503, {"name": "m", "ready": False})
        assert (await c.get("/v2/health/live")).json() == {"live": True}  # alive all the same
        r = await c.get("/v2/models/nope/ready")
        assert r.status_code == 404 and "nope" in r.json()["error"]
    asgi(check)


@contextlib.contextmanager
def uvicorn_in_thread(app: Any) -> Iterator[str]:
    """The app on a real socket (uvicorn, its own loop in a thread, lifespan on); yields its URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def test_stock_clients_read_health_tritonclient_and_kserve_shapes():
    """tritonclient's is_server_live/is_server_ready/is_model_ready, and the reads KServe's
    InferenceRESTClient does (`response.json().get("live")`, `.get("ready")`), which failed on empty bodies."""
    tritonclient_http = pytest.importorskip("tritonclient.http")
    app, core = build()
    with uvicorn_in_thread(app) as addr:
        client = tritonclient_http.InferenceServerClient(addr)
        try:
            assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("m")
            assert not client.is_model_ready("nope")
            live = httpx.get(f"http://{addr}/v2/health/live")
            ready = httpx.get(f"http://{addr}/v2/health/ready")
            assert live.json().get("live") is True and ready.json().get("ready") is True  # KServe's reads
            assert httpx.get(f"http://{addr}/v2/models/m/ready").json() == {"name": "m", "ready": True}
            core.replicas[0].kill()
            assert client.is_server_live() and not client.is_server_ready() and not client.is_model_ready("m")
        finally:
            client.close()


# ---- 2. framework errors in V2's shape -------------------------------------------------------------
def test_unknown_route_wrong_method_and_bad_query_answer_error_not_detail():
    async def check(c: httpx.AsyncClient, core: Any) -> None:
        r = await c.get("/v2/nothing/here")
        assert r.status_code == 404 and r.json() == {"error": "no route /v2/nothing/here"}
        r = await c.delete("/v2/health/live")
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        assert r.json() == {"error": "method DELETE is not allowed on /v2/health/live (allowed: GET)"}
        r = await c.get("/v2/models/m/infer")
        assert r.status_code == 405 and "POST" in r.headers["allow"] and "error" in r.json()
        r = await c.get("/admin/decisions", params={"since_ms": "yesterday"}, headers=AUTH)
        assert r.status_code == 400 and set(r.json()) == {"error"}
        assert "since_ms" in r.json()["error"], r.json()
    asgi(check)


# ---- 3. OpenAPI says what each route answers -------------------------------------------------------
def test_openapi_documents_every_status_without_fastapi_422():
    app, _ = build()
    spec = app.openapi()
    paths = spec["paths"]
    for path, ops in paths.items():
        for method, op in ops.items():
            assert "422" not in op["responses"], (method, path)
            for status, resp in op["responses"].items():
                if status == "200" or (status == "503" and path.endswith("/ready")):  # {"ready": false}
                    continue
                assert resp["content"]["application/json"]["schema"]["required"] == ["error"], (path, status)
    assert "HTTPValidationError" not in str(spec)
    assert paths["/v2/health/live"]["get"]["responses"]["200"]["content"]["application/json"]["schema"][
        "required"] == ["live"]
    assert set(paths["/v2/health/ready"]["get"]["responses"]) == {"200", "503"}
    assert {"200", "404", "503"} <= set(paths["/v2/models/{model_name}/ready"]["get"]["responses"])
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == [CONTENT_TYPE_LATEST]
    infer = paths["/v2/models/{model_name}/infer"]["post"]["responses"]
    assert {"200", "400", "404", "413", "500", "503", "504"} <= set(infer)
    for path in ("/admin/replicas", "/admin/batch", "/admin/replicas/{name}/cpu", "/admin/decisions"):
        op = next(iter(paths[path].values()))
        assert {"200", "401", "403"} <= set(op["responses"]) and op["security"] == [{"adminToken": []}], path
    assert spec["components"]["securitySchemes"]["adminToken"]["scheme"] == "bearer"
    batch = paths["/admin/batch"]["put"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["properties"]["batch"]["maximum"] == 16


# ---- 5. bounds on admin inputs; the token from the environment or a file ----------------------------
@pytest.mark.parametrize("value", [0, -1, 17, 1_000_000_000, 2.5, "8", None, True])
def test_admin_batch_outside_1_to_max_batch_is_a_400_naming_batch(value):
    async def check(c: httpx.AsyncClient, core: Any) -> None:
        before = core.batcher.batch_size
        r = await c.put("/admin/batch", json={"batch": value}, headers=AUTH)
        assert r.status_code == 400 and "'batch'" in r.json()["error"], r.text
        assert core.batcher.batch_size == before
    asgi(check)


def test_admin_batch_within_bounds_is_applied():
    async def check(c: httpx.AsyncClient, core: Any) -> None:
        for b in (1, 16, 8.0):
            r = await c.put("/admin/batch", json={"batch": b}, headers=AUTH)
            assert r.status_code == 200 and r.json() == {"batch": int(b)} == {"batch": core.batcher.batch_size}
        r = await c.put("/admin/replicas/r0/cpu", json={"cpu_m": 5000}, headers=AUTH)
        assert r.status_code == 400 and "cpu_m" in r.json()["error"]  # the CPU resize was bounded already
    asgi(check)


def test_admin_token_from_environment_or_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("SPONGE_ADMIN_TOKEN", "from-env")
    assert resolve_admin_token(ServerConfig.load()) == "from-env"
    monkeypatch.delenv("SPONGE_ADMIN_TOKEN")
    f = tmp_path / "token"
    f.write_text("  from-file\n")
    assert resolve_admin_token(ServerConfig.load(None, {"admin_token_file": str(f)})) == "from-file"
    with pytest.raises(ConfigError, match="both set"):
        resolve_admin_token(ServerConfig.load(None, {"admin_token_file": str(f), "admin_token": "x"}))
    f.write_text("\n")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_admin_token(ServerConfig.load(None, {"admin_token_file": str(f)}))
    with pytest.raises(ConfigError, match="cannot read"):
        resolve_admin_token(ServerConfig.load(None, {"admin_token_file": str(tmp_path / "missing")}))
    from sponge.cli import build_parser

    args = build_parser().parse_args(["serve", "--admin-token-file", str(f)])
    assert args.admin_token_file == str(f)


# ---- 4. start-up checks, before anything is spawned ------------------------------------------------
def test_port_check_refuses_a_listening_port_and_passes_a_free_one():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(StartupError, match=rf"^port {port} on 127\.0\.0\.1 is in use$"):
            check_port_free("127.0.0.1", port)
    check_port_free("127.0.0.1", port)  # closed again: free
    check_port_free("127.0.0.1", 0)


def test_model_file_that_is_not_onnx_is_a_config_error(tmp_path: Path):
    from sponge.models.trivial import trivial_model_path

    for name, content in (("text.onnx", b"hello, not a model\n"), ("empty.onnx", b""), ("junk.onnx", bytes(range(256)))):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(ConfigError, match="is not an ONNX model"):
            check_onnx_file(p)
    check_onnx_file(trivial_model_path())
