"""Each program's Prometheus endpoint, scraped over mTLS after a session."""

from __future__ import annotations

import re
import ssl
import time
from pathlib import Path

import httpx
import pytest

from controller import lab
from tests.integration.controller_env import ControllerEnv, make_env
from vmrepl.v1 import controller_pb2 as api

pytestmark = pytest.mark.integration

SETTINGS = {"metrics_listen": "127.0.0.1:0"}


def _port(process: lab.AgentProcess) -> int:
    for e in process.events():
        if e.get("event") == "metrics_listening":
            return int(str(e["port"]))
    raise AssertionError(f"{process.module} logged no metrics_listening")


def _scrape(env: ControllerEnv, process: lab.AgentProcess, identity: str = "reader") -> dict[str, float]:
    d = env.certs.directory
    ctx = ssl.create_default_context(cafile=str(d / "ca.pem"))
    ctx.load_cert_chain(str(d / f"{identity}.pem"), str(d / f"{identity}.key"))
    text = httpx.get(f"https://localhost:{_port(process)}/metrics", verify=ctx, timeout=10).text
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(vmrepl_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


def test_every_program_serves_metrics_over_mtls(tmp_path: Path, lab_certs: lab.LabCerts) -> None:
    env = make_env(tmp_path, lab_certs, disk_mib=8, proxy_settings=SETTINGS, target_settings=SETTINGS)
    try:
        env.restart_controller(**SETTINGS)
        env.configure()
        assert env.run_job().state == api.SESSION_STATE_SUCCEEDED
        target = _scrape(env, env.target)
        assert target["vmrepl_target_streams_total"] == 3
        assert target['vmrepl_target_bytes_total{kind="data"}'] > 0
        assert target["vmrepl_target_streams_open"] == 0
        proxy = _scrape(env, env.proxy)
        assert proxy['vmrepl_proxy_transfers_ended_total{state="completed"}'] == 3
        assert proxy['vmrepl_proxy_bytes_total{kind="read"}'] >= 3 * 8 * (1 << 20) * 0.6
        assert proxy['vmrepl_proxy_stage_busy_seconds_total{stage="source_read"}'] > 0
        controller = _scrape(env, env.controller)
        assert controller['vmrepl_sessions_ended_total{state="succeeded"}'] == 1
        assert controller['vmrepl_tasks_ended_total{state="succeeded"}'] == 3
        assert controller['vmrepl_bytes_total{kind="sent"}'] > 0
        assert controller['vmrepl_tasks{state="running"}'] == 0
        deadline = time.monotonic() + 10  # the gauges are refreshed from the database every two seconds
        while _scrape(env, env.controller).get('vmrepl_sessions{state="succeeded"}') != 1:
            assert time.monotonic() < deadline, "vmrepl_sessions never showed the succeeded session"
            time.sleep(0.5)
        with pytest.raises(httpx.HTTPError):  # no client certificate: refused
            ctx = ssl.create_default_context(cafile=str(env.certs.directory / "ca.pem"))
            httpx.get(f"https://localhost:{_port(env.target)}/metrics", verify=ctx, timeout=5)
    finally:
        env.stop()
