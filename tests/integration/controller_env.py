"""A controller, a proxy and a target as real processes, a file host with VMs, and API clients."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import field_mask_pb2, json_format

from controller import lab
from tests.support.certs import tls_settings
from tests.support.controller_db import seed_controller_database
from vmrepl.extent import MiB
from vmrepl.providers.filehost import FileHostProvider
from vmrepl.security.tls import channel_credentials
from vmrepl.v1 import controller_pb2 as api
from vmrepl.v1 import controller_pb2_grpc, target_pb2_grpc

FINAL = (api.SESSION_STATE_SUCCEEDED, api.SESSION_STATE_INCOMPLETE, api.SESSION_STATE_FAILED)


@dataclass
class ControllerEnv:
    work: Path
    certs: lab.LabCerts
    host: Path
    target: lab.AgentProcess
    proxy: lab.AgentProcess
    controller: lab.AgentProcess
    database_url: str = ""

    # ---- processes ---------------------------------------------------------------------------------

    def restart_controller(self, **settings: Any) -> None:
        """Run the controller again (same database), with other settings such as the crash hook."""
        self.controller.stop()
        config = lab.controller_config(self.work, self.certs, database_url=self.database_url, **settings)
        self.controller = lab.AgentProcess("controller", config, self.work / "controller.log")
        self.controller.start()

    def stop(self) -> None:
        for p in (self.controller, self.proxy, self.target):
            p.stop()

    # ---- API -----------------------------------------------------------------------------------------

    def client(self, identity: str = "operator") -> Any:
        tls = tls_settings(self.certs, identity)
        return controller_pb2_grpc.ControllerServiceStub(
            grpc.secure_channel(self.controller.address, channel_credentials(tls))
        )

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "controller.cli", "--controller", self.controller.address]
        cmd += ["--certs-dir", str(self.certs.directory), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, check=False, env={**os.environ, "COLUMNS": "200"})
        if check and out.returncode != 0:
            raise AssertionError(f"vmrepl {' '.join(args)} exited {out.returncode}: {out.stdout}{out.stderr}")
        return out

    def configure(self, *, job: str = "job1", vms: tuple[str, ...] = ("vm1", "vm2"), **job_settings: Any) -> None:
        stub = self.client()
        if not list(stub.ListTargets(api.ListTargetsRequest()).targets):
            stub.CreateTarget(
                api.CreateTargetRequest(target_id="target", target=api.Target(address=self.target.address))
            )
            stub.CreateProxy(api.CreateProxyRequest(proxy_id="proxy1", proxy=api.Proxy(address=self.proxy.address)))
            stub.CreateHost(
                api.CreateHostRequest(host_id="lab", host=api.Host(provider="file", address=str(self.host)))
            )
        spec = api.Job(
            host="hosts/lab",
            target="targets/target",
            replica_root=f"replicas/{job}",
            vms=[api.JobVm(vm=v) for v in vms],
            **job_settings,
        )
        stub.CreateJob(api.CreateJobRequest(job_id=job, job=spec))

    def session(self, name: str) -> api.Session:
        session: api.Session = self.client().GetSession(api.GetSessionRequest(name=name))
        return session

    def wait_session(self, name: str, timeout: float = 120) -> api.Session:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                s = self.session(name)
                if s.state in FINAL:
                    return s
            except grpc.RpcError:
                pass  # the controller is restarting
            time.sleep(0.2)
        raise TimeoutError(f"{name} did not end within {timeout}s")

    def wait_until(self, name: str, ok: Callable[[api.Session], bool], timeout: float = 60) -> api.Session:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s = self.session(name)
            if ok(s):
                return s
            if s.state in FINAL:
                raise AssertionError(f"{name} ended before the condition: {json_format.MessageToJson(s)}")
            time.sleep(0.05)
        raise TimeoutError(f"condition on {name} not met within {timeout}s")

    def unlimit(self, job: str = "job1") -> None:
        """Lifts the job's bandwidth limit (set by tests that act while a session runs)."""
        mask = field_mask_pb2.FieldMask(paths=["bandwidth_limit_mbps"])
        self.client().UpdateJob(api.UpdateJobRequest(job=api.Job(name=f"jobs/{job}"), update_mask=mask))

    def run_job(self, job: str = "job1") -> api.Session:
        s = self.client().StartJob(api.StartJobRequest(name=f"jobs/{job}"))
        return self.wait_session(s.name)

    def target_stub(self) -> Any:
        tls = tls_settings(self.certs, "controller")
        return target_pb2_grpc.TargetAgentStub(grpc.secure_channel(self.target.address, channel_credentials(tls)))

    def points(self, job: str = "job1") -> list[api.JobRestorePoint]:
        """Every restore point of the job, all pages."""
        stub, out, token = self.client(), [], ""
        while True:
            request = api.ListJobRestorePointsRequest(parent=f"jobs/{job}", page_size=1000, page_token=token)
            page = stub.ListJobRestorePoints(request)
            out += page.restore_points
            if not (token := page.next_page_token):
                return out

    def operate_crashing_at(
        self, n: int, op: api.ReplicaOperation.ValueType, *, failback_host: str = "", vm: str = "vm1"
    ) -> bool:
        """A replica operation with the controller set to exit after its nth state change, then the controller
        again without the hook: the operation ends, succeeded. Whether the hook fired."""
        self.restart_controller(test_crash_at_transition=n)
        proc = self.controller.proc
        assert proc is not None
        request = api.StartReplicaOperationRequest(
            job="jobs/job1", operation=op, groups=[api.VmGroup(vms=[vm])], failback_host=failback_host
        )
        try:
            self.client().StartReplicaOperation(request, timeout=10)
        except grpc.RpcError as e:
            assert e.code() is grpc.StatusCode.UNAVAILABLE, e  # the hook fired inside the call itself
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                sessions = self.client().ListSessions(api.ListSessionsRequest(page_size=1)).sessions
            except grpc.RpcError:
                sessions = []  # the controller is exiting
            if sessions and sessions[0].state not in (api.SESSION_STATE_RUNNING, api.SESSION_STATE_STOPPING):
                break
            time.sleep(0.05)
        time.sleep(0.3)  # the hook may fire at the session's last change, right after it shows as ended
        crashed = proc.poll() is not None
        self.restart_controller()
        last = self.client().ListSessions(api.ListSessionsRequest(page_size=1)).sessions[0]
        final = self.wait_session(last.name)
        assert final.state == api.SESSION_STATE_SUCCEEDED, (n, final.error)
        return crashed

    # ---- VMs and replicas -------------------------------------------------------------------------------

    def vm(self, name: str) -> Any:
        return FileHostProvider(self.host).vm(name)

    def replica(self, vm: str, disk: str = "disk0", job: str = "job1") -> Path:
        vm_id = str(self.vm(vm).manifest.id)
        return self.work / "datastore" / "replicas" / job / vm_id / "disks" / disk / "data.raw"

    def vm_names(self) -> list[str]:
        """The VM folders of the file host (not the provider's own `.vmrepl-host`)."""
        return [p.name for p in sorted(self.host.iterdir()) if not p.name.startswith(".")]

    def disks(self) -> Iterator[tuple[str, str]]:
        for name in self.vm_names():
            for d in self.vm(name).manifest.disks:
                yield name, d.id


def make_env(
    work: Path,
    certs: lab.LabCerts,
    *,
    sample_vm: bool = False,
    disk_mib: int = 16,
    database_url: str = "",
    proxy_settings: dict[str, Any] | None = None,
    target_settings: dict[str, Any] | None = None,
) -> ControllerEnv:
    """Two VMs with three disks: vm1 (disk0, disk1) and vm2 (disk0)."""
    host = work / "host"
    host.mkdir()
    if sample_vm:
        vm1 = lab.create_sample_vm(host, "vm1", size=64 * MiB)
    else:
        vm1 = lab.create_raw_vm(host, "vm1", size=disk_mib * MiB, seed=11)
    lab.add_raw_disk(vm1, "disk1", disk_mib * MiB, seed=12)
    lab.create_raw_vm(host, "vm2", size=disk_mib * MiB, seed=13)
    target_config = lab.target_config(work, certs, level="debug", **(target_settings or {}))
    target = lab.AgentProcess("target_agent", target_config, work / "target.log")
    # Small batches and window: acks every 2 MiB, so stops and crashes land between commits.
    proxy_config = lab.proxy_config(
        work, certs, sources=host, batch_bytes=MiB, window_batches=4, **(proxy_settings or {})
    )
    proxy = lab.AgentProcess("proxy_agent", proxy_config, work / "proxy.log")
    if not database_url:
        seed_controller_database(work / "controller")
    controller_config = lab.controller_config(work, certs, database_url=database_url)
    controller = lab.AgentProcess("controller", controller_config, work / "controller.log")
    env = ControllerEnv(work, certs, host, target, proxy, controller, database_url)
    lab.start_all([target, proxy, controller])
    return env
