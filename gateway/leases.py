"""Leases: requests a worker takes ahead from a key's shared RPM bucket, so that its calls
admit here, with no round trip to Redis on their path.

With Redis, a call's admission is a round trip before it is routed: 0.2 to 0.5 ms on a
VM, most of it waiting for two processes to wake (issue 11 allows 0.2). For a key whose
RPM limit is large, one round trip instead takes a lease of ``size`` requests
(``share`` of the limit) from the shared bucket, and this worker's calls take them
here for ``LEASE_TTL`` seconds; what a lease leaves unused is given back when it ends.
The next lease is asked in the background once the current one is half used or half
aged, so a steady caller never waits for Redis. What holds, and what it changes:

- Never more calls than the limit: a leased request was taken from the shared bucket,
  atomically, like any other.
- A limit under ``LEASE_MIN / share`` (200 a minute with the defaults) gets no leases:
  every call asks Redis, exactly as before, and so does a key with per-model limits,
  ``maxConcurrent`` or a budget (``Limiter.admit``).
- Near the limit: a lease is only taken while the bucket keeps twice its size after it;
  then every call asks Redis. Requests that a worker holds unused may meanwhile refuse a
  call on another worker: at most ``size`` per worker, for at most ``LEASE_TTL``.
- TPM is checked here against the level Redis last reported, refilled since, less this
  worker's own charges since; below ``TPM_RESERVE`` of its capacity every call asks
  Redis. Another worker's charge that leaves the bucket there is announced (published
  by the charge's script): from the moment this worker hears it (about a millisecond
  later; ``Limiter.catch_up`` applies it before a call looks at its key), its calls ask
  Redis. Smaller charges elsewhere are seen with the next lease.
- A killed worker's unused requests are lost to the bucket until it refills them (the
  bucket refills ``size`` in 60 * ``share`` seconds: 0.6 s).
- ``X-RateLimit-Remaining-*``: the level Redis last reported, refilled, plus what this
  worker holds unused; other workers' unused leases count as used.

Pure: the clock (``time.monotonic``'s) is passed in; the limiter does the I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from gateway.buckets import Bucket

LEASE_MIN = 2  # requests: a smaller lease saves too few round trips to be worth holding
LEASE_TTL = 0.5  # seconds a lease's requests may be used; then the rest is given back
TPM_RESERVE = 0.1  # of the TPM capacity: below it, every call asks Redis


def size(limit: int, share: float) -> int:
    """Requests a lease takes of a per-minute ``limit`` (0: none, every call asks)."""
    n = math.floor(limit * share) if share > 0 else 0
    return n if n >= LEASE_MIN else 0


@dataclass(eq=False, slots=True)
class Lease:
    """Requests taken from the shared bucket at ``granted``, ``left`` of them unused."""

    left: int
    granted: float

    def live(self, now: float) -> bool:
        return now - self.granted < LEASE_TTL


@dataclass(eq=False, slots=True)
class Holding:
    """What one worker holds of one key's limits: its leases and its view of the buckets."""

    rpm: Bucket
    tpm: Bucket | None
    size: int
    leases: list[Lease] = field(default_factory=list)  # oldest first; two at most
    rpm_level: float = 0.0  # the shared levels Redis last reported, at ``synced``
    tpm_level: float = 0.0
    synced: float = -math.inf
    spent: int = 0  # tokens this worker charged to TPM since then
    doubted: float = -math.inf  # when the TPM bucket was last said to be near empty
    asking: bool = False  # a lease is being asked for

    def seen(self, levels: tuple[float, ...], asked: float, now: float) -> None:
        """Redis reported the levels of the RPM and TPM buckets (in that order) to a
        question asked at ``asked``."""
        self.rpm_level = levels[0]
        if self.tpm is not None and asked >= self.doubted:
            self.tpm_level = levels[1]
        self.synced, self.spent = now, 0

    def doubt(self, now: float) -> None:
        """Another worker's charge left the TPM bucket at or below ``TPM_RESERVE``: ask
        Redis until a question asked from now on says otherwise."""
        self.tpm_level, self.doubted = -math.inf, now

    def charged(self, tokens: int) -> None:
        """This worker charged a finished call's tokens to TPM."""
        self.spent += tokens

    def take(self, now: float) -> tuple[int, int | None] | None:
        """One request from a live lease, and the RPM and TPM remaining to report; None
        when the call must ask Redis (no live lease, or TPM near empty)."""
        lease = next((x for x in self.leases if x.left and x.live(now)), None)
        if lease is None:
            return None
        tpm_left = None
        if self.tpm is not None:
            tpm_left = self._level(self.tpm, self.tpm_level, now) - self.spent
            if tpm_left <= self.tpm.capacity * TPM_RESERVE:
                return None
        lease.left -= 1
        rpm_left = self._level(self.rpm, self.rpm_level, now) + self.unused(now)
        return (
            max(0, math.floor(min(rpm_left, self.rpm.capacity))),
            None if tpm_left is None else max(0, math.floor(tpm_left)),
        )

    def unused(self, now: float) -> int:
        """Requests held in live leases, unused."""
        return sum(x.left for x in self.leases if x.live(now))

    def wants(self, now: float) -> bool:
        """Time to ask for the next lease: none is asked for, the bucket keeps twice a
        lease after it, and the live leases are half used or half aged (or none is)."""
        if self.asking or self._level(self.rpm, self.rpm_level, now) < 3 * self.size:
            return False
        live = [x for x in self.leases if x.left and x.live(now)]
        if len(live) >= 2:
            return False
        return not live or (
            live[0].left <= self.size // 2 or now - live[0].granted >= LEASE_TTL / 2
        )

    def add(self, now: float) -> Lease:
        """A lease of ``size`` requests was granted now."""
        lease = Lease(self.size, now)
        self.leases.append(lease)
        return lease

    def end(self, lease: Lease) -> int:
        """``lease`` is over: the requests it left unused, to give back."""
        if lease in self.leases:
            self.leases.remove(lease)
        left, lease.left = lease.left, 0
        return left

    def _level(self, bucket: Bucket, level: float, now: float) -> float:
        if now > self.synced:
            level += (now - self.synced) * bucket.rate
        return min(level, bucket.capacity)
