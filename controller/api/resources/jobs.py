"""Jobs: their messages, checks and changes (schedule, VMs, policy, webhook)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from google.protobuf import json_format
from google.protobuf.message import Message
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from controller.api.resources.common import by_name, check_printable, parse_name, timestamp
from controller.db.models import Credential, Host, Job, JobVm, RestorePoint, Target
from controller.db.secrets import SecretBox
from controller.observability.webhooks import redact_url
from controller.scheduling.schedule import parse_schedule, schedule_json, schedule_message
from vmrepl.domain import (
    CHECKPOINT_HOLD_LIMIT,
    FULL_CHECK_EVERY_LIMIT,
    JOB_DEFAULTS,
    KEEP_LIMIT,
    REPLICA_FORMATS,
    RETRIES_LIMIT,
    RETRY_WAIT_LIMIT,
    ChangeTracking,
    Compression,
    DiskFormat,
    check_block_size,
    replica_format,
)
from vmrepl.errors import FailedPrecondition, InvalidArgument, NotFound
from vmrepl.names import check_relative
from vmrepl.v1 import common_pb2
from vmrepl.v1 import controller_pb2 as api

JOB_FIELDS = (
    "host",
    "target",
    "replica_root",
    "vms",
    "restore_points_to_keep",
    "compression",
    "block_size",
    "bandwidth_limit_mbps",
    "change_tracking",
    "guest_processing",
    "exclusions",
    "schedule",
    "checkpoint_hold_seconds",
    "disabled",
    "webhook",
    "retries",
    "retry_wait_seconds",
    "full_check_every",
    "replica_format",
    "failover_host",
    "network_mapping",
    "failback_target",
)
# A job's network mapping: at most this many switches, each name as Hyper-V allows (1 to 100 characters).
MAX_NETWORK_MAPPINGS = 64


M = TypeVar("M", bound=Message)


def settings_json(msg: Message) -> dict[str, Any]:
    """The stored JSON of guest_processing or exclusions (the database keeps typed settings as JSON objects;
    the schedule's conversions are scheduling.schedule's): the message's fields by their proto names."""
    return json_format.MessageToDict(msg, preserving_proto_field_name=True)


def settings_message(kind: type[M], raw: dict[str, Any]) -> M:
    """A stored guest_processing or exclusions object as its message. A row from before the settings were
    typed, when any JSON object was taken, may hold keys the message lacks or values of another type:
    those are left out of the reply (the row keeps them; nothing ever read them)."""
    try:
        return json_format.ParseDict(raw, kind(), ignore_unknown_fields=True)
    except json_format.ParseError:
        return kind()


async def job_msg(db: AsyncSession, row: Job) -> api.Job:
    host, target = await db.get(Host, row.host_id), await db.get(Target, row.target_id)
    return api.Job(
        name=f"jobs/{row.name}",
        host=f"hosts/{host.name}" if host else "",
        target=f"targets/{target.name}" if target else "",
        replica_root=row.replica_root,
        vms=[api.JobVm(vm=v.vm_ref, excluded_disks=[str(d) for d in v.excluded_disks]) for v in row.vms],
        restore_points_to_keep=row.restore_points_to_keep,
        compression=row.compression,
        block_size=row.block_size,
        bandwidth_limit_mbps=row.bandwidth_limit_mbps,
        change_tracking=row.change_tracking,
        guest_processing=settings_message(api.GuestProcessing, row.guest_processing),
        exclusions=settings_message(common_pb2.GuestExclusions, row.exclusions),
        schedule=schedule_message(row.schedule) if row.schedule else None,
        checkpoint_hold_seconds=row.checkpoint_hold_seconds,
        disabled=not row.enabled,
        create_time=timestamp(row.created_at),
        webhook=api.Webhook(
            url=str(row.webhook.get("shown_url", "")), failures_only=bool(row.webhook.get("failures_only"))
        )
        if row.has_webhook
        else None,
        retries=row.retries,
        retry_wait_seconds=row.retry_wait_seconds,
        full_check_every=row.full_check_every,
        replica_format=DiskFormat(row.replica_format).to_proto()
        if row.replica_format
        else common_pb2.DISK_FORMAT_UNSPECIFIED,
        **await _failover_fields(db, row),
    )


async def _failover_fields(db: AsyncSession, row: Job) -> dict[str, Any]:
    host = await db.get(Host, row.failover_host_id) if row.failover_host_id else None
    back = await db.get(Target, row.failback_target_id) if row.failback_target_id else None
    return {
        "failover_host": f"hosts/{host.name}" if host else "",
        "failback_target": f"targets/{back.name}" if back else "",
        "network_mapping": [
            api.NetworkMapping(source_switch=str(m["source_switch"]), target_switch=str(m["target_switch"]))
            for m in row.network_mapping
        ],
    }


def _vms(msg: api.Job) -> list[JobVm]:
    if not msg.vms:
        raise InvalidArgument("job.vms", "lists no VM")
    seen: set[str] = set()
    out = []
    for i, v in enumerate(msg.vms):
        if not v.vm or len(v.vm) > 256:
            raise InvalidArgument(f"job.vms[{i}].vm", "is required: a VM id or name, up to 256 characters")
        check_printable(f"job.vms[{i}].vm", v.vm)
        if v.vm in seen:
            raise InvalidArgument(f"job.vms[{i}].vm", f"{v.vm!r} is listed twice")
        seen.add(v.vm)
        out.append(JobVm(vm_ref=v.vm, excluded_disks=list(v.excluded_disks)))
    return out


async def apply_job(db: AsyncSession, msg: api.Job, row: Job, paths: Iterable[str], *, secrets: SecretBox) -> None:
    paths = list(paths)
    before = (row.replica_format, row.host_id)
    for path in paths:
        if path == "webhook":
            row.webhook = _webhook(msg.webhook, secrets, current=row.webhook)
        else:
            await _apply_job_field(db, msg, row, path)
    if "replica_root" in paths or "target" in paths:
        others = await db.execute(
            select(Job.name, Job.replica_root).where(Job.target_id == row.target_id, Job.id != row.id)
        )
        for name, root in others.all():
            if roots_overlap(row.replica_root, root):
                raise InvalidArgument(
                    "job.replica_root",
                    f"{row.replica_root!r} overlaps {root!r} of jobs/{name} on the same target: each job "
                    "needs a folder of its own, neither inside the other",
                )
    if row.id is not None and (row.replica_format, row.host_id) != before:
        await _check_format_kept(db, row)


def replica_format_setting(value: common_pb2.DiskFormat.ValueType) -> str:
    """Job.replica_format as the database keeps it: "raw" or "vhdx", "" when unspecified (the host's own)."""
    if value == common_pb2.DISK_FORMAT_UNSPECIFIED:
        return ""
    for fmt in REPLICA_FORMATS:
        if fmt.to_proto() == value:
            return fmt.value
    if value == common_pb2.DISK_FORMAT_VHD:
        raise InvalidArgument("job.replica_format", "VHD is not written as a replica: RAW or VHDX")
    raise InvalidArgument("job.replica_format", f"{value} is not a format: RAW or VHDX (unspecified: the host's own)")


async def _check_format_kept(db: AsyncSession, row: Job) -> None:
    """A job whose replicas have restore points keeps their format: the target never converts a replica disk
    (it refuses a prepare in another format), so every later session would fail."""
    host = await db.get(Host, row.host_id)
    new = replica_format(row.replica_format, host_provider=host.provider if host else "")
    points = list(await db.scalars(select(RestorePoint.disks).where(RestorePoint.job_id == row.id)))
    kept = {str(d.get("format", "")) for disks in points for d in disks if isinstance(d, dict)}
    if not points or kept <= {new.value}:
        return
    raise FailedPrecondition(
        f"job.replica_format: jobs/{row.name} has restore points whose replica disks are "
        f"{', '.join(sorted(kept))}; formats are not converted, so it cannot become {new.value}: replicate "
        "to another job (another replica_root) in the new format"
    )


def roots_overlap(a: str, b: str) -> bool:
    """Whether one replica root is the other or inside it, component by component and ignoring case (a
    Windows target's folders do)."""
    pa, pb = a.casefold().split("/"), b.casefold().split("/")
    n = min(len(pa), len(pb))
    return pa[:n] == pb[:n]


async def _apply_job_field(db: AsyncSession, msg: api.Job, row: Job, path: str) -> None:
    if path == "host":
        row.host_id = (await by_name(db, Host, "job.host", msg.host, "hosts")).id
    elif path == "target":
        row.target_id = (await by_name(db, Target, "job.target", msg.target, "targets")).id
    elif path == "replica_root":
        check_relative("job.replica_root", msg.replica_root)
        row.replica_root = msg.replica_root
    elif path == "vms":
        row.vms = _vms(msg)
    elif path == "restore_points_to_keep":
        keep = msg.restore_points_to_keep or JOB_DEFAULTS.restore_points_to_keep
        row.restore_points_to_keep = KEEP_LIMIT.check("job.restore_points_to_keep", keep)
    elif path == "compression":
        row.compression = Compression.parse("job.compression", msg.compression)
    elif path == "block_size":
        row.block_size = check_block_size("job.block_size", msg.block_size or JOB_DEFAULTS.block_size)
    elif path == "bandwidth_limit_mbps":
        if not 0 <= msg.bandwidth_limit_mbps <= 1e6:
            raise InvalidArgument("job.bandwidth_limit_mbps", "must be from 0 (unlimited) to 1000000")
        row.bandwidth_limit_mbps = msg.bandwidth_limit_mbps
    elif path == "change_tracking":
        row.change_tracking = ChangeTracking.parse("job.change_tracking", msg.change_tracking)
    elif path == "disabled":
        row.enabled = not msg.disabled
    elif path == "replica_format":
        row.replica_format = replica_format_setting(msg.replica_format)
    else:
        await _apply_job_policy(db, msg, row, path)


async def _apply_job_policy(db: AsyncSession, msg: api.Job, row: Job, path: str) -> None:
    """Schedule, notification and retry settings."""
    if path == "schedule":
        raw = schedule_json(msg.schedule)
        schedule = parse_schedule(raw)
        if schedule.kind == "after":
            await _check_follows(db, row, schedule.after_job)
        row.schedule = raw
    elif path == "guest_processing":
        await _check_guest_processing(db, msg.guest_processing)
        row.guest_processing = settings_json(msg.guest_processing)
    elif path == "exclusions":
        _check_exclusions(msg.exclusions)
        row.exclusions = settings_json(msg.exclusions)
    elif path == "checkpoint_hold_seconds":
        hold = msg.checkpoint_hold_seconds or JOB_DEFAULTS.checkpoint_hold_seconds
        row.checkpoint_hold_seconds = CHECKPOINT_HOLD_LIMIT.check("job.checkpoint_hold_seconds", hold)
    elif path == "retries":
        retries = msg.retries if msg.HasField("retries") else JOB_DEFAULTS.retries
        row.retries = RETRIES_LIMIT.check("job.retries", retries)
    elif path == "retry_wait_seconds":
        wait = msg.retry_wait_seconds if msg.HasField("retry_wait_seconds") else JOB_DEFAULTS.retry_wait_seconds
        row.retry_wait_seconds = RETRY_WAIT_LIMIT.check("job.retry_wait_seconds", wait)
    elif path == "full_check_every":
        every = msg.full_check_every if msg.HasField("full_check_every") else JOB_DEFAULTS.full_check_every
        row.full_check_every = FULL_CHECK_EVERY_LIMIT.check("job.full_check_every", every)
    else:
        await _apply_failover_field(db, msg, row, path)


# Providers whose hosts can register, start and stop VMs (vmrepl.providers.base.Provider.register_vm).
REGISTERING_PROVIDERS = ("file", "hyperv")


async def _apply_failover_field(db: AsyncSession, msg: api.Job, row: Job, path: str) -> None:
    """Where failed-over VMs run, how their NICs connect there, and which target writes a failback."""
    if path == "failover_host":
        row.failover_host_id = None
        if msg.failover_host:
            host = await by_name(db, Host, "job.failover_host", msg.failover_host, "hosts")
            if host.provider not in REGISTERING_PROVIDERS:
                raise InvalidArgument("job.failover_host", f"host {host.name} ({host.provider}) cannot register VMs")
            row.failover_host_id = host.id
    elif path == "failback_target":
        row.failback_target_id = None
        if msg.failback_target:
            target = await by_name(db, Target, "job.failback_target", msg.failback_target, "targets")
            row.failback_target_id = target.id
    elif path == "network_mapping":
        row.network_mapping = _network_mapping(msg)


def _network_mapping(msg: api.Job) -> list[dict[str, str]]:
    if len(msg.network_mapping) > MAX_NETWORK_MAPPINGS:
        raise InvalidArgument("job.network_mapping", f"lists more than {MAX_NETWORK_MAPPINGS} switches")
    out: list[dict[str, str]] = []
    for i, m in enumerate(msg.network_mapping):
        for name, value in (("source_switch", m.source_switch), ("target_switch", m.target_switch)):
            if not 1 <= len(value) <= 100:
                raise InvalidArgument(
                    f"job.network_mapping[{i}].{name}", "must be a switch name of 1 to 100 characters"
                )
            check_printable(f"job.network_mapping[{i}].{name}", value)
        # Without case: Hyper-V names switches so, and the provider looks them up so (one of two would be taken).
        if any(o["source_switch"].casefold() == m.source_switch.casefold() for o in out):
            raise InvalidArgument(f"job.network_mapping[{i}].source_switch", f"{m.source_switch!r} is mapped twice")
        out.append({"source_switch": m.source_switch, "target_switch": m.target_switch})
    return out


async def _check_follows(db: AsyncSession, row: Job, after_job: str) -> None:
    """The job `after_job` names exists, and neither it nor a job it follows in turn follows `row`: such a
    chain never runs (each waits for the other's session). Compared by name, so a job being created that
    names itself is refused as such, not as a job that does not exist yet."""
    field = "job.schedule.after_job"
    name, chain = parse_name(field, after_job, "jobs"), [row.name]
    while name not in chain:
        upstream = await db.scalar(select(Job).where(Job.name == name))
        if upstream is None:
            if len(chain) == 1:
                raise NotFound(f"{field}: jobs/{name} does not exist")
            return  # further up, a job deleted since: the chain ends there
        chain.append(name)
        follows = upstream.schedule or {}
        if follows.get("kind") != "after":
            return
        name = str(follows.get("after_job", "")).removeprefix("jobs/")
    if name == row.name:
        cycle = " -> ".join(f"jobs/{n}" for n in [*chain, name])
        raise InvalidArgument(field, f"a job cannot follow itself ({cycle}): none of them would ever run")


async def _check_guest_processing(db: AsyncSession, g: api.GuestProcessing) -> None:
    if g.credential:
        await by_name(db, Credential, "job.guest_processing.credential", g.credential, "credentials")


def _check_exclusions(ex: common_pb2.GuestExclusions) -> None:
    if len(ex.guest_paths) > 256:
        raise InvalidArgument("job.exclusions.guest_paths", "lists more than 256 paths")
    for i, path in enumerate(ex.guest_paths):
        if not path or len(path) > 1024:
            raise InvalidArgument(f"job.exclusions.guest_paths[{i}]", "must be a path of 1 to 1024 characters")
        check_printable(f"job.exclusions.guest_paths[{i}]", path)


def _webhook(w: api.Webhook, secrets: SecretBox, *, current: dict[str, Any] | None) -> dict[str, Any]:
    """The stored form: the URL sealed like a credential's secret, and the redacted form replies show."""
    if not w.url:
        return {}
    if current and current.get("sealed_url") and w.url == current.get("shown_url"):
        # What a reply showed, sent back (a read-modify-write): the stored URL stays.
        return {**current, "failures_only": w.failures_only}
    try:
        parts = urlsplit(w.url)
        valid = parts.scheme in ("http", "https") and bool(parts.hostname) and len(w.url) <= 2048
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number up to 65535
    except ValueError:
        valid = False
    if not valid or any(ord(c) < 32 or ord(c) == 127 for c in w.url):
        raise InvalidArgument("job.webhook.url", "must be an http or https URL, up to 2048 characters")
    if w.url.endswith("/…"):
        # A shown (redacted) URL copied from another job: storing it would drop the credentials silently.
        raise InvalidArgument("job.webhook.url", "is a redacted URL as replies show it; give the full URL")
    return {
        "sealed_url": secrets.seal(w.url).decode("ascii"),
        "shown_url": redact_url(w.url),
        "failures_only": w.failures_only,
    }
