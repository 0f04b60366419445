"""A call's admission: the limits it must pass before it is routed, and what it owes after.

``admit`` is asked once per /v1 call, after authentication and validation and before
routing. It refuses a key over its monthly budget (402), else takes one of the key's
``maxConcurrent`` slots (if it has such a limit) and one request from its RPM bucket and
from any per-model buckets (``model_limits``) while its TPM bucket is above zero, all or
nothing in one atomic step, one round trip to Redis (``Limiter.admit``; none for most
calls of a key with a large RPM limit, taken from the worker's lease: ``leases``).
A refusal is a 429 (402 for the budget) in the caller's shape with Retry-After and the
X-RateLimit-* headers, counted in /metrics by what refused it; the call goes nowhere and is
not recorded.

What was admitted is a ``Permit``. It carries the headers, claims the call's request id
(``X-NexusGate-ReqId``: a repeat gets the stored answer, or 409 while the first runs),
and is settled exactly once: ``finished`` when the call's record is final (its answer
kept for repeats or its request id released, the slot given back, its real tokens
charged to TPM, its cost added to the month's spend, all in one write to Redis, sent
before the answer goes and not waited for; the call counted), or ``cancel`` when it
never opened. A JSON call with no slot, no request id and no budget owes only its
tokens and cost: they are sent once its answer is written (``pay``, by the view's
answer). Nothing is reserved up front, so a cancelled call or a stopped worker leaks
nothing; a worker killed mid-call leaves a slot and a claim that lapse within
``INFLIGHT_TTL``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import gevent

from gateway import dedup, metrics, pricing
from gateway.auth import Caller
from gateway.dedup import Stored
from gateway.errors import BudgetExceeded, RateLimited
from gateway.exchange import Exchange, new_uid
from gateway.limiter import Admission, limiter
from gateway.model_limits import model_limits

log = logging.getLogger(__name__)

# A repeat that finds its first call in flight looks again this much later before it
# answers 409: a first call whose answer just went out is settling its claim right then.
RECHECK = 0.05
MESSAGES = {
    "rpm": "Rate limit exceeded: too many requests per minute",
    "tpm": "Rate limit exceeded: token quota exhausted",
}


def admit(caller: Caller, model: str, stream: bool) -> Permit:
    """Admit a call of ``caller`` naming ``model`` now, or raise RateLimited (429).

    A key that spent its monthly budget is refused first (BudgetExceeded, 402), taking
    nothing from its other limits.
    """
    uid = new_uid()
    slot = bool(caller.max_concurrent and caller.max_concurrent > 0)
    try:
        admission = limiter.admit(
            caller.id,
            caller.rpm_limit,
            caller.tpm_limit,
            model_limits.buckets(model),
            slot=(uid, caller.max_concurrent) if slot else None,
            budget=caller.budget_usd,
        )
    except BudgetExceeded:
        metrics.rejected(caller.id, caller.comment, "budget")  # counted as the 429s are
        raise
    if not admission.allowed:
        kind = admission.limit_type or "rpm"
        if kind == "concurrency":
            message = (
                f"Too many requests in flight: this key allows {caller.max_concurrent} at once"
            )
            raise _refused(caller, kind, message, 1, admission)
        if kind.startswith("model:"):
            message = f"Rate limit exceeded for model '{kind.removeprefix('model:')}'"
            kind = "model"
        else:
            message = MESSAGES.get(kind, "Rate limit exceeded")
        raise _refused(caller, kind, message, admission.retry_after, admission)
    _gauge(caller, admission)
    return Permit(caller, uid, admission, stream, slot)


def _refused(
    caller: Caller, kind: str, message: str, retry_after: int, admission: Admission
) -> RateLimited:
    metrics.rejected(caller.id, caller.comment, kind)
    return RateLimited(message, retry_after=retry_after, limits=admission.headers())


def _gauge(caller: Caller, admission: Admission) -> None:
    """What this admission left of the key's limits, for nexusgate_api_key_*_{usage,limit}."""
    if admission.failed_open or admission.rpm_limit is None or admission.tpm_limit is None:
        return
    metrics.key_usage(
        caller.id,
        caller.comment,
        {
            "rpm": {
                "current": admission.rpm_limit - admission.rpm_remaining,
                "limit": admission.rpm_limit,
            },
            "tpm": {
                "current": admission.tpm_limit - admission.tpm_remaining,
                "limit": admission.tpm_limit,
            },
        },
    )


@dataclass(eq=False)
class Permit:
    """What an admitted call holds until it is settled, once."""

    caller: Caller
    uid: str  # the call's, and its record's
    admission: Admission
    stream: bool
    slot: bool = False  # holds one of the key's maxConcurrent slots
    req_id: str | None = None  # a claimed request id: repeats get this call's answer
    # Claimed on a store that may have lost the claim of a call still running with it
    # (``Limiter.claim_unsure``): ``replay.lookup`` asks the records.
    unsure: bool = False
    settled: bool = False
    _unpaid: dict | None = None  # what ``pay`` charges once the answer is written

    def headers(self) -> dict[str, str]:
        """The X-RateLimit-* headers of this call's answer."""
        return self.admission.headers()

    def claim(self, req_id: str) -> Stored | None:
        """Claim ``req_id``: None to make the call, a stored answer to replay; 409 in flight."""
        holder, unsure = limiter.claim_unsure(self.caller.id, req_id, self.uid)
        if holder is not None and holder.answer is None:
            gevent.sleep(RECHECK)
            holder, unsure = limiter.claim_unsure(self.caller.id, req_id, self.uid)
        if holder is None:
            self.req_id, self.unsure = req_id, unsure  # unsure: the records say if it runs
            return None
        if holder.answer is None:
            raise dedup.in_flight(req_id, self.stream, holder.age, holder.started)
        stored = Stored.loads(holder.answer)
        if stored is None:  # unreadable (another version's): make the call, unclaimed
            log.warning("admission: the stored answer of a request id is unreadable")
        return stored

    def cancel(self) -> None:
        """The call never opened: give its slot back and release its request id."""
        if self.settled:
            return
        self.settled = True
        if self.req_id is not None:
            limiter.unclaim(self.caller.id, self.req_id, self.uid)
        if self.slot:
            limiter.leave(self.caller.id, self.uid)

    def finished(self, exchange: Exchange, answer: dict | None) -> None:
        """The call's record is final: ``settle`` what it owes, and ``count`` it."""
        self.settle(exchange, answer, exchange.usage, exchange.cost)
        self.count(exchange)

    def settle(
        self, exchange: Exchange, answer: dict | None, usage: dict | None, cost: dict | None
    ) -> None:
        """Settle the call's request id, slot, tokens and spend, once.

        ``answer`` is the whole answer (an IR response), or None when there is none (the
        upstream failed or was cut off): then a repeat makes the call anew, because a
        client retrying after a failure wants an answer, not the failure again.
        ``usage`` and ``cost`` are the call's: a stream settles before its record is
        final (its terminal event waits for this, and its record for its client's copy).
        """
        if self.settled:
            return
        self.settled = True
        usage = usage or {}
        try:
            kept = None
            if self.req_id is not None and answer is not None:
                if exchange.source_uid is None:  # kept in the record too (older repeats)
                    exchange.answer = answer
                source = exchange.source_uid or exchange.uid
                kept = Stored(source, answer, exchange.model_id, exchange.provider_id).dumps()
            owed = {
                "tpm": self.caller.tpm_limit,
                "tokens": (usage.get("input_tokens") or 0) + (usage.get("output_tokens") or 0),
                "nanos": pricing.nanos(cost),
            }
            if not (self.req_id or self.slot or self.stream or self.caller.budget_usd):
                self._unpaid = owed  # paid once its answer is written (``pay``)
            else:
                # One write, the request id first, sent before the answer goes: a repeat
                # or a next call sent on receiving it, to any worker, finds it all done.
                limiter.finish(self.caller.id, self.uid, req_id=self.req_id, answer=kept, **owed)
        except Exception:  # the record must still be written
            log.exception("admission: settling a finished call failed")

    def count(self, exchange: Exchange) -> None:
        """The call in /metrics, once its record is final."""
        try:
            metrics.call_finished(exchange, self.caller.comment)
        except Exception:  # the record must still be written
            log.exception("admission: counting a finished call failed")

    @property
    def owes(self) -> bool:
        """``finished`` left a charge for ``pay``."""
        return self._unpaid is not None

    def pay(self) -> None:
        """Charge what ``finished`` left owing: the tokens and cost of a JSON call that
        holds no slot and no request id and whose key has no budget, sent once its
        answer is written (issue 11: a write to Redis before the answer cost it 0.05 to
        0.15 ms). Nothing a next call must find done is left for here: TPM is a check
        that the bucket is above zero, and a charge lands on the shared store before
        this connection's next request is read (for a next call on another connection,
        microseconds after the answer; milliseconds on a busy worker). A budget must
        see the spend of the call that crossed it before the next is admitted: a key
        with one pays before its answer."""
        owed, self._unpaid = self._unpaid, None
        if owed is None:
            return
        try:
            limiter.finish(self.caller.id, self.uid, **owed)
        except Exception:
            log.exception("admission: charging a finished call failed")
