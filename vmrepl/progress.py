"""A transfer's figures: one typed schema from the proxy's progress message to the controller's database.

The proxy reports a TransferProgress; the controller reads it into `TransferFigures`, stores that as the
task's JSON (`to_json`), and builds its API messages and metrics from it, live or from the database
(`from_json`). Every program that counts, stores or shows a transfer's figures uses this one schema.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vmrepl.v1 import common_pb2, proxy_pb2

# Figures stored by earlier versions carry keys this schema no longer has (the verification in words): ignored.
_MODEL = ConfigDict(frozen=True, extra="ignore")
Count = Annotated[int, Field(ge=0)]
Seconds = Annotated[float, Field(ge=0)]


class Skipped(BaseModel):
    """Bytes of the disk that did not travel, by reason."""

    model_config = _MODEL
    zero: Count = 0
    unallocated: Count = 0
    unchanged: Count = 0
    excluded: Count = 0

    def __add__(self, other: Skipped) -> Skipped:
        return Skipped(
            zero=self.zero + other.zero,
            unallocated=self.unallocated + other.unallocated,
            unchanged=self.unchanged + other.unchanged,
            excluded=self.excluded + other.excluded,
        )

    def to_proto(self) -> common_pb2.SkippedBytes:
        return common_pb2.SkippedBytes(**self.model_dump())


class StageBusy(BaseModel):
    """Seconds each pipeline stage was busy; source_read and compress are summed over `threads` workers."""

    model_config = _MODEL
    source_read: Seconds = 0.0
    compress: Seconds = 0.0
    network_wait: Seconds = 0.0
    target_write: Seconds = 0.0
    threads: Count = 1  # 0 in figures of a transfer that never ran: read as 1

    def seconds(self) -> dict[str, float]:
        """Busy seconds per stage (source, proxy, network, target), the threaded stages per thread."""
        threads = max(1, self.threads)
        return {
            "source": self.source_read / threads,
            "proxy": self.compress / threads,
            "network": self.network_wait,
            "target": self.target_write,
        }


class Sample(BaseModel):
    """Sampled verification after a changed-range pass (SampledVerification on the wire)."""

    model_config = _MODEL
    sampled_blocks: Count = 0
    mismatched_blocks: Count = 0

    def to_proto(self) -> common_pb2.SampledVerification:
        return common_pb2.SampledVerification(**self.model_dump())

    def words(self, passes: int) -> str:
        """What the sample showed, for people; empty when none was taken."""
        if not self.sampled_blocks:
            return ""
        if not self.mismatched_blocks:
            return f"sampled {self.sampled_blocks} unsent blocks: equal"
        return (
            f"sample differed ({self.mismatched_blocks} of {self.sampled_blocks} unsent blocks): "
            f"re-run as digest comparison, pass {passes}"
        )


class FullCheckFigures(BaseModel):
    """What a periodic full check found (FullCheck on the wire): blocks that differed from the replica, and
    those of them the host's change tracking had not reported (repaired), with their byte ranges."""

    model_config = _MODEL
    differed_blocks: Count = 0
    repaired_blocks: Count = 0
    # (offset, length) in bytes, merged, in offset order; the proxy reports the first 1000 only.
    repaired_ranges: list[tuple[Count, Count]] = []

    @classmethod
    def from_proto(cls, m: common_pb2.FullCheck) -> FullCheckFigures:
        return cls(
            differed_blocks=m.differed_blocks,
            repaired_blocks=m.repaired_blocks,
            repaired_ranges=[(r.offset, r.length) for r in m.repaired_ranges],
        )

    def to_proto(self) -> common_pb2.FullCheck:
        ranges = [common_pb2.ByteRange(offset=o, length=n) for o, n in self.repaired_ranges]
        return common_pb2.FullCheck(
            differed_blocks=self.differed_blocks, repaired_blocks=self.repaired_blocks, repaired_ranges=ranges
        )

    def words(self, shown: int = 10) -> str:
        """For people: only blocks the change tracking missed are called repaired (the others are changes a
        changed-range incremental would have sent as well)."""
        blocks = "1 block" if self.differed_blocks == 1 else f"{self.differed_blocks} blocks"
        if not self.differed_blocks:
            return "full check: every block equals the replica"
        if not self.repaired_blocks:
            return (
                f"full check: {blocks} differed from the replica, all reported by the host's change tracking; "
                "none repaired"
            )
        n = self.repaired_blocks
        missed = (
            f"{'1 block' if n == 1 else f'{n} blocks'} differed from the replica although the host's change "
            f"tracking did not report {'it' if n == 1 else 'them'}"
        )
        ranges = ", ".join(f"{o}+{length}" for o, length in self.repaired_ranges[:shown])
        rest = len(self.repaired_ranges) - shown
        more = f" and {rest} more range{'s' if rest > 1 else ''}" if rest > 0 else ""
        return f"full check: {missed}; repaired at byte offset+length {ranges}{more}"


class TransferFigures(BaseModel):
    """A transfer's counters as the proxy last reported them."""

    model_config = _MODEL
    bytes_read: Count = 0
    bytes_data: Count = 0
    bytes_sent: Count = 0
    skipped: Skipped = Skipped()
    busy: StageBusy = StageBusy()
    resumes: Count = 0
    passes: Count = 0
    sample: Sample = Sample()
    # Set when the transfer was a periodic full check (a digest comparison standing in for changed ranges).
    full_check: FullCheckFigures | None = None
    elapsed_seconds: Seconds = 0.0

    @classmethod
    def from_progress(cls, p: proxy_pb2.TransferProgress) -> TransferFigures:
        s, b = p.skipped, p.busy
        return cls(
            bytes_read=p.bytes_read,
            bytes_data=p.bytes_data,
            bytes_sent=p.bytes_sent,
            skipped=Skipped(zero=s.zero, unallocated=s.unallocated, unchanged=s.unchanged, excluded=s.excluded),
            busy=StageBusy(
                source_read=b.source_read,
                compress=b.compress,
                network_wait=b.network_wait,
                target_write=b.target_write,
                threads=max(1, b.threads),
            ),
            resumes=p.resumes,
            passes=p.passes,
            sample=Sample(sampled_blocks=p.sample.sampled_blocks, mismatched_blocks=p.sample.mismatched_blocks),
            full_check=FullCheckFigures.from_proto(p.full_check) if p.HasField("full_check") else None,
            elapsed_seconds=max(0.0, round(p.elapsed_seconds, 3)),
        )

    def to_json(self) -> dict[str, Any]:
        """The database's JSON form."""
        return self.model_dump(mode="json")

    @classmethod
    def from_json(cls, raw: object) -> TransferFigures:
        """From the database's JSON; a row with none (a task not started) or unreadable figures reads as zeros."""
        try:
            return cls.model_validate(raw if isinstance(raw, dict) else {})
        except ValidationError:
            return cls()

    @property
    def verification(self) -> str:
        """What was verified, in words: a full check's findings, else the sample's; empty for neither."""
        if self.full_check is not None:
            return self.full_check.words()
        return self.sample.words(self.passes)

    def byte_counts(self) -> list[tuple[str, int]]:
        """Bytes by kind: read from the source, data (before compression), sent (wire), skipped per reason."""
        return [
            ("read", self.bytes_read),
            ("data", self.bytes_data),
            ("sent", self.bytes_sent),
            *self.skipped.model_dump().items(),
        ]

    def stage_seconds(self) -> dict[str, float]:
        """Busy seconds per pipeline stage as reported (summed over threads)."""
        return self.busy.model_dump(exclude={"threads"})
