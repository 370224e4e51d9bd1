"""The Hyper-V host stand-in as a process, for `make demo-hyperv` and tests that kill processes.

    python -m tests.support.hyperv.serve --root DIR [--state SEED.json] [--certs DIR] [--auth basic|ntlm]

`--root` holds the model (host.json, drives/); a new root is filled from `--state`, a JSON seed:

    {"host": {"name": "HV01", "os_build": 17763},
     "vms": [{"name": "web01", "disks": [["C:\\\\Hyper-V\\\\Virtual Hard Disks\\\\web01.vhdx", 67108864]],
              "generation": 2, "processors": 2}]}

and an existing root is served as it is (a restarted process keeps its VMs, checkpoints and reference
points). The WS-Man user is `lab.USERNAME`; the password is read from the file `--password-file`, else the
fixed lab password (`lab.PASSWORD`); it is never printed. When ready the process prints one JSON line on stdout:

    {"url": ..., "port": ..., "ca": ..., "drives": ..., "control": "http://127.0.0.1:N/control", "token": ...}

and serves until SIGTERM/SIGINT. The control endpoint (127.0.0.1 only; header `Authorization: Bearer <token>`)
takes a POST of one JSON object and answers JSON; see `control()` for the operations (guest writes, faults,
job policy, a vanished reference point, RCT off, an old host, the state). `ControlClient` calls it.
"""

from __future__ import annotations

import argparse
import base64
import hmac
import json
import random
import secrets
import signal
import sys
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.support.hyperv import faults
from tests.support.hyperv.lab import PASSWORD, hyperv_lab
from tests.support.hyperv.model import HyperVHost, JobPolicy, add_switch
from tests.support.hyperv.state import NicState

MAX_CONTROL_BODY = 64 * 1024 * 1024


def seed(host: HyperVHost, doc: dict[str, Any]) -> None:
    """Host facts and VMs from a seed document (see the module's docstring)."""
    facts = doc.get("host", {})
    host.set_host(os_build=facts.get("os_build"), name=facts.get("name"))
    for vm in doc.get("vms", []):
        settings = {k: v for k, v in vm.items() if k not in ("name", "disks", "nics")}
        nics = [NicState(**n) for n in vm["nics"]] if "nics" in vm else None
        host.add_vm(vm["name"], disks=[(p, int(s)) for p, s in vm["disks"]], nics=nics, **settings)


def _write(host: HyperVHost, req: dict[str, Any]) -> dict[str, Any]:
    if "data" in req:
        data = base64.b64decode(req["data"], validate=True)
    else:  # {"length": n, "seed": s}: n pseudo-random bytes, without shipping them
        data = random.Random(req.get("seed", 0)).randbytes(int(req["length"]))
    host.write(req["vm"], req["disk"], int(req["offset"]), data)
    return {"written": len(data)}


def control(host: HyperVHost, req: dict[str, Any]) -> dict[str, Any]:
    """One control operation: `{"op": ..., ...}`."""
    op = req.get("op")
    if op == "write":  # vm, disk (index, instance id or base path), offset, data (base64) or length + seed
        return _write(host, req)
    if op == "read":  # vm, disk, offset, length -> data (base64)
        data = host.read(req["vm"], req["disk"], int(req["offset"]), int(req["length"]))
        return {"data": base64.b64encode(data).decode()}
    if op == "fault":  # fault: {"kind": "ReturnCode"|"JobFails"|"JobHangs"|"SlowJob"|"Stall", ...fields}
        host.add_fault(faults.from_json(req["fault"]))
        return {}
    if op == "clear_faults":
        host.clear_faults()
        return {}
    if op == "job_policy":  # asynchronous (bool), polls
        host.job_policy = JobPolicy(bool(req["asynchronous"]), int(req.get("polls", 2)))
        return {}
    if op == "vanish_reference_point":  # id
        host.vanish_reference_point(req["id"])
        return {}
    if op == "set_rct":  # vm, enabled
        host.set_rct_enabled(req["vm"], bool(req["enabled"]))
        return {}
    if op == "set_host":  # os_build and/or name
        host.set_host(os_build=req.get("os_build"), name=req.get("name"))
        return {}
    if op == "user_checkpoint":  # vm, name
        return {"id": host.user_checkpoint(req["vm"], req["name"]).id}
    if op == "guest_shutdown":  # vm, behaviour ("clean" | "ignores" | "none"), polls (clean: polls until off)
        host.set_guest_shutdown(req["vm"], req["behaviour"], int(req.get("polls", 2)))
        return {}
    if op == "add_switch":  # name, type ("External" | "Internal" | "Private"): a failover host's network
        add_switch(host, req["name"], req.get("type", "External"))
        return {}
    if op == "state":
        return {"state": host.state.model_dump(mode="json"), "calls": list(host.calls)}
    raise ValueError(f"unknown control operation {op!r}")


def _control_server(host: HyperVHost, token: str) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            given = self.headers.get("Authorization", "")
            if self.path != "/control" or not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self._reply(403, {"error": "forbidden"})
                return
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= MAX_CONTROL_BODY:
                self._reply(400, {"error": "a JSON object body is required"})
                return
            try:
                req = json.loads(self.rfile.read(length))
                if not isinstance(req, dict):
                    raise ValueError("the body is not a JSON object")
                self._reply(200, control(host, req))
            except (ValueError, KeyError, TypeError) as e:
                self._reply(400, {"error": f"{type(e).__name__}: {e}"})

        def _reply(self, status: int, doc: dict[str, Any]) -> None:
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    return httpd


class ControlClient:
    """Calls a serve process's control endpoint (the `control` and `token` it printed)."""

    def __init__(self, url: str, token: str) -> None:
        self.url, self._token = url, token

    def __call__(self, op: str, **fields: Any) -> dict[str, Any]:
        body = json.dumps({"op": op, **fields}).encode()
        req = urllib.request.Request(
            self.url, data=body, headers={"Authorization": f"Bearer {self._token}", "Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            doc = json.loads(resp.read())
        if not isinstance(doc, dict):
            raise ValueError("the control endpoint answered something else than an object")
        return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.hyperv.serve", description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", type=Path, required=True, help="the model's folder (host.json, drives/)")
    ap.add_argument("--state", type=Path, help="a JSON seed (host facts, VMs) for a new root")
    ap.add_argument("--certs", type=Path, help="the lab certificate folder (Basic over HTTPS); made if empty")
    ap.add_argument("--auth", choices=("basic", "ntlm"), default="basic")
    ap.add_argument("--password-file", type=Path, help="the WS-Man password (default: the fixed lab password)")
    args = ap.parse_args(argv)
    args.root.mkdir(parents=True, exist_ok=True)
    fresh = not (args.root / "host.json").exists()
    host = HyperVHost(args.root)
    if fresh and args.state is not None:
        seed(host, json.loads(args.state.read_text(encoding="utf-8")))
    password = args.password_file.read_text(encoding="utf-8").strip() if args.password_file else PASSWORD
    certs = args.certs or (args.root / "certs" if args.auth == "basic" else None)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    token = secrets.token_urlsafe(24)
    with hyperv_lab(args.root, certs=certs, auth=args.auth, password=password, host=host) as lab:
        ctl = _control_server(host, token)
        threading.Thread(target=ctl.serve_forever, name="hyperv-control", daemon=True).start()
        ready = {
            "url": lab.url,
            "port": lab.port,
            "ca": str(lab.ca_bundle) if lab.ca_bundle else None,
            "drives": str(lab.drives),
            "username": lab.username,
            "control": f"http://127.0.0.1:{ctl.server_address[1]}/control",
            "token": token,
        }
        print(json.dumps(ready), flush=True)
        stop.wait()
        ctl.shutdown()
        ctl.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
