"""ControllerService: the gRPC API over the configuration database and the session engine.

Roles come from the caller's certificate: `operator` may call everything,
`reader` only the Get, List and Watch methods. Credentials' secrets are
accepted, sealed and stored; no reply or log line carries one.
"""

from controller.api.inventory import InventoryApi
from controller.api.jobs import JobsApi
from controller.api.sessions import SessionsApi
from vmrepl.v1 import controller_pb2_grpc


class ControllerServicer(InventoryApi, JobsApi, SessionsApi, controller_pb2_grpc.ControllerServiceServicer):
    """The whole service: each section (inventory, jobs, sessions) in its own module over controller.api.base."""
