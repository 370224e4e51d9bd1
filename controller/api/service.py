"""ControllerService: the gRPC API over the configuration database and the session engine.

Roles come from the caller's certificate: `operator` may call everything,
`reader` only the Get, List and Watch methods (ROLES, enforced by vmrepl.rpc
before a request is read). Credentials' secrets are accepted, sealed and
stored; no reply or log line carries one.
"""

from controller.api.inventory import InventoryApi
from controller.api.jobs import JobsApi
from controller.api.operations import OperationsApi
from controller.api.replica_reads import ReplicaReadsApi
from controller.api.replicas import ReplicasApi
from controller.api.sessions import SessionsApi
from vmrepl.rpc import Service
from vmrepl.v1 import controller_pb2, controller_pb2_grpc

READ = ("operator", "reader")
WRITE = ("operator",)
# Who may call what: the one access policy of the API (a method missing here stops the server at start).
ROLES: dict[str, tuple[str, ...]] = {
    "CreateCredential": WRITE,
    "GetCredential": READ,
    "ListCredentials": READ,
    "UpdateCredential": WRITE,
    "DeleteCredential": WRITE,
    "CreateHost": WRITE,
    "GetHost": READ,
    "ListHosts": READ,
    "ListHostVms": READ,
    "UpdateHost": WRITE,
    "DeleteHost": WRITE,
    "CreateProxy": WRITE,
    "GetProxy": READ,
    "ListProxies": READ,
    "UpdateProxy": WRITE,
    "DeleteProxy": WRITE,
    "CreateTarget": WRITE,
    "GetTarget": READ,
    "ListTargets": READ,
    "UpdateTarget": WRITE,
    "DeleteTarget": WRITE,
    "CreateJob": WRITE,
    "GetJob": READ,
    "ListJobs": READ,
    "UpdateJob": WRITE,
    "DeleteJob": WRITE,
    "StartJob": WRITE,
    "StopJob": WRITE,
    "ListSessions": READ,
    "GetSession": READ,
    "WatchSession": READ,
    "GetSessionLog": READ,
    "ListJobRestorePoints": READ,
    "ListJobReplicas": READ,
    "RollbackJobReplica": WRITE,
    # Both read every block on the target: an operator's call, not a reader's (a flood of them is a load
    # on the target's disks, and an export hands out the VM's data).
    "VerifyJobReplica": WRITE,
    "ExportRestorePoint": WRITE,
    # Failover and the rest change where VMs run: an operator's; where a VM stands is anyone's to read.
    "StartReplicaOperation": WRITE,
    "GetReplicaVm": READ,
    "ListReplicaVms": READ,
}


class ControllerServicer(
    InventoryApi,
    JobsApi,
    SessionsApi,
    ReplicasApi,
    ReplicaReadsApi,
    OperationsApi,
    controller_pb2_grpc.ControllerServiceServicer,
):
    """The whole service: each section (inventory, jobs, sessions, replicas, replica reads) in its own module over
    controller.api.base."""


def controller_service(servicer: ControllerServicer) -> Service:
    """The service as the daemon serves it, with its access policy."""
    return Service(controller_pb2.DESCRIPTOR.services_by_name["ControllerService"], servicer, roles=ROLES)
