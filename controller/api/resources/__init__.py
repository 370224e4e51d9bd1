"""API resources: names, validation of incoming messages, and conversion between rows and messages.

Pure of I/O except the lookups each function receives a database session for. One module per resource;
this package names what the API uses.
"""

from controller.api.resources.agents import PROXY_FIELDS, TARGET_FIELDS, apply_agent, proxy_msg, target_msg
from controller.api.resources.common import (
    by_name,
    check_address,
    check_id,
    check_printable,
    mask_paths,
    parse_name,
    timestamp,
)
from controller.api.resources.credentials import check_secret, check_username, credential_msg
from controller.api.resources.hosts import (
    HOST_FIELDS,
    SYSTEM_FOLDERS,
    SYSTEM_TREES,
    apply_host,
    check_host_folder,
    host_msg,
    host_vm_msg,
)
from controller.api.resources.jobs import JOB_FIELDS, apply_job, job_msg, roots_overlap

__all__ = [
    "HOST_FIELDS",
    "JOB_FIELDS",
    "PROXY_FIELDS",
    "SYSTEM_FOLDERS",
    "SYSTEM_TREES",
    "TARGET_FIELDS",
    "apply_agent",
    "apply_host",
    "apply_job",
    "by_name",
    "check_address",
    "check_host_folder",
    "check_id",
    "check_printable",
    "check_secret",
    "check_username",
    "credential_msg",
    "host_msg",
    "host_vm_msg",
    "job_msg",
    "mask_paths",
    "parse_name",
    "proxy_msg",
    "roots_overlap",
    "target_msg",
    "timestamp",
]
