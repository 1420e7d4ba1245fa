"""Serving replicas (docs/SCALE.md): Debian's nginx with docker/nginx.conf, rewritten for this
machine by benchmarks/bench_replicas.py exactly as its benchmark runs it, in front of two real
``mris serve`` processes with the session's tiny trained bundle. In CI (``CI=true``) a missing
nginx fails."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import httpx
import pytest
import yaml
from conftest import require_binary
from serve_process import ServeProcess, free_port

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_replicas import NGINX_CONF, REWRITTEN, Nginx, local_nginx_conf  # noqa: E402

TOKEN = "replicas-test-token"


@pytest.fixture(scope="module")
def nginx_binary() -> str:
    return require_binary("nginx", "nginx")


@pytest.fixture(scope="module")
def replicas(localised_bundles, tmp_path_factory):
    """Two ``mris serve`` replicas of one bundle, with a token."""
    env = {"MRIS_API_TOKEN": TOKEN, "MRIS_INTRA_OP_THREADS": "1", "MRIS_DECODE_WORKERS": "1"}
    logs = tmp_path_factory.mktemp("replicas")
    servers = [
        ServeProcess(localised_bundles["model"], localised_bundles["index"], env, logs / f"{i}.log")
        for i in range(2)
    ]
    try:
        for server in servers:
            server.start()
        yield servers
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="module")
def radiograph(tiny_cohort) -> bytes:
    from mris.manifest import read_manifest

    table = read_manifest(tiny_cohort)
    return table.resolve_path(sorted({row.radiograph_path for row in table.rows})[0]).read_bytes()


def _synthesize(url: str, data: bytes, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        f"{url}/synthesize",
        files={"file": ("knee.dcm", data, "application/dicom")},
        data={"k": "3"},
        headers=headers,
        timeout=60,
    )


def test_the_rewrite_changes_only_the_marked_lines_and_nginx_accepts_it(nginx_binary, tmp_path):
    upstreams = ["127.0.0.1:18001", "127.0.0.1:18002"]
    local = local_nginx_conf(upstreams, "127.0.0.1:18080", tmp_path).splitlines()
    original = NGINX_CONF.read_text().splitlines()
    unmarked = [line for line in original if not line.rstrip().endswith(REWRITTEN)]
    assert [line for line in local if line in unmarked] == unmarked
    servers = [line.strip() for line in local if line.strip().startswith("server 127.")]
    assert servers == [f"server {u} max_fails=3 fail_timeout=10s;" for u in upstreams]
    assert "listen 127.0.0.1:18080;" in [line.strip() for line in local]
    assert not any("/tmp/nginx" in line for line in local)  # every path moved to tmp_path

    proxy = Nginx(nginx_binary, upstreams)
    result = proxy.test()
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_the_proxy_keeps_in_step_with_the_service_limits():
    from mris.service.config import Settings

    conf = NGINX_CONF.read_text()
    settings = Settings()
    body_mb = re.search(r"client_max_body_size (\d+)m;", conf)
    assert body_mb and float(body_mb.group(1)) == settings.max_upload_mb
    for timeout in ("proxy_read_timeout", "proxy_send_timeout"):
        seconds = re.search(rf"{timeout} (\d+)s;", conf)
        assert seconds and float(seconds.group(1)) > settings.request_timeout_s


def test_synthesize_through_the_proxy_equals_a_direct_one(nginx_binary, replicas, radiograph):
    with Nginx(nginx_binary, [server.url.removeprefix("http://") for server in replicas]) as proxy:
        direct = _synthesize(replicas[0].url, radiograph)
        assert direct.status_code == 200, direct.text
        through = [_synthesize(proxy.url, radiograph) for _ in range(4)]
        assert [r.status_code for r in through] == [200] * 4
        assert all(r.json() == direct.json() for r in through)
        # the bearer token travels to the replicas, which guard the route themselves
        refused = _synthesize(proxy.url, radiograph, token=None)
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        assert httpx.get(f"{proxy.url}/readyz", timeout=10).json()["status"] == "ready"
    # both replicas served (least_conn: one request at a time alternates between them)
    served = re.findall(r"upstream=(\S+)", (proxy.workdir / "access.log").read_text())
    assert {address for address in served} == {s.url.removeprefix("http://") for s in replicas}


def test_a_replica_that_is_down_is_passed_over(nginx_binary, replicas, radiograph):
    down = f"127.0.0.1:{free_port()}"  # nothing listens there
    live = replicas[1].url.removeprefix("http://")
    with Nginx(nginx_binary, [down, live]) as proxy:
        assert [_synthesize(proxy.url, radiograph).status_code for _ in range(3)] == [200] * 3
    with Nginx(nginx_binary, [down]) as nothing:
        answer = _synthesize(nothing.url, radiograph)
        assert answer.status_code == 503
        assert answer.headers["content-type"] == "application/problem+json"
        assert answer.headers["retry-after"] == "5"
        assert answer.json()["status"] == 503


def test_compose_replicas_profile():
    """``docker compose up`` is unchanged (``api`` on 8000); the ``replicas`` profile adds
    port-less ``api-replica`` containers and the proxy that owns the published port."""
    services = yaml.safe_load((REPO / "docker-compose.yml").read_text())["services"]
    api, replica, proxy = services["api"], services["api-replica"], services["proxy"]
    assert "profiles" not in api and api["ports"] == ["8000:8000"]
    assert replica["profiles"] == proxy["profiles"] == ["replicas"]
    assert "ports" not in replica or replica["ports"] == []
    assert replica["image"] == api["image"] and replica["healthcheck"] == api["healthcheck"]
    assert proxy["image"].startswith("nginx:")
    assert proxy["depends_on"]["api-replica"]["condition"] == "service_healthy"
    assert "./docker/nginx.conf:/etc/nginx/nginx.conf:ro" in proxy["volumes"]
    # the upstream names the replica service (Docker DNS gives every replica's address)
    assert re.search(r"server api-replica:8000 resolve", NGINX_CONF.read_text())
    assert json.dumps(proxy["ports"]).count(":8080") == 1
