"""How unkind the local AWS is: the dials of the behaviours AWS has and a kind local stack would hide.

Two profiles. ``aws`` is AWS's ordinary behaviour (the default for ``make run``, ``make serve`` and the
tests): Wait states a few hundred milliseconds late, small clock offsets between execution environments,
warm environments reused and cold ones paid for. ``hostile`` turns every dial up, for the fault suite,
the benchmarks and the tests marked ``hostile``: Wait states seconds late, clock offsets of +-500 ms, a
cold start on every invoke, a share of Lambda results lost after the handler did its work and a share of
EventBridge's events delivered twice.

The limits (256 KiB state payload, 25,000 history events, 6 MB Lambda payloads, API Gateway's 29 s, 10 MB
and 6 MB) and each function's Timeout are enforced in both: they are AWS's rules, not its moods.
``docs/local-stack.md`` gives the figures and where they come from.
"""

from __future__ import annotations

import os
import random

from pydantic import BaseModel, ConfigDict, Field


class Lateness(BaseModel):
    """How late a Wait state wakes: a triangular distribution in milliseconds (never early, as on AWS)."""

    model_config = ConfigDict(frozen=True)

    low_ms: float = Field(ge=0)
    mode_ms: float = Field(ge=0)
    high_ms: float = Field(ge=0)

    def draw(self, rng: random.Random) -> float:
        """Seconds to add to the Wait's target."""
        if self.high_ms <= self.low_ms:
            return self.low_ms / 1000
        return (
            rng.triangular(self.low_ms, self.high_ms, min(max(self.mode_ms, self.low_ms), self.high_ms))
            / 1000
        )


class Profile(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    wait_lateness: Lateness
    # Each new execution environment draws its clock offset uniformly from +-this.
    clock_offset_ms: float = Field(ge=0)
    # A fresh environment (process) for every invoke instead of reusing a warm one.
    cold_start_every_invoke: bool = False
    # A warm environment unused for this long is reaped, as Lambda reclaims idle ones.
    warm_idle_s: float = Field(default=300, gt=0)
    # Execution environments per function at once (reserved concurrency); past it: TooManyRequestsException.
    reserved_concurrency: int = Field(default=20, ge=1)
    # Share of Step Functions' Lambda task invokes whose result is lost after the handler ran
    # (Lambda.ServiceException): the state machine retries, the handler runs again.
    service_exception_share: float = Field(default=0.0, ge=0, le=1)
    # Share of EventBridge's deliveries to a Lambda target made twice (it delivers at least once).
    duplicate_event_share: float = Field(default=0.0, ge=0, le=1)
    seed: int | None = None

    def rng(self) -> random.Random:
        return random.Random(self.seed)


AWS = Profile(
    name="aws",
    wait_lateness=Lateness(low_ms=50, mode_ms=250, high_ms=1500),
    clock_offset_ms=20,
    reserved_concurrency=20,
)

HOSTILE = Profile(
    name="hostile",
    wait_lateness=Lateness(low_ms=200, mode_ms=1500, high_ms=5000),
    clock_offset_ms=500,
    cold_start_every_invoke=True,
    service_exception_share=0.1,
    duplicate_event_share=0.5,
)

PROFILES = {profile.name: profile for profile in (AWS, HOSTILE)}
PROFILE_VARIABLE = "LOCAL_AWS_PROFILE"


def profile_named(name: str | None = None) -> Profile:
    """The profile by name, else ``$LOCAL_AWS_PROFILE``, else ``aws``."""
    chosen = name or os.environ.get(PROFILE_VARIABLE) or "aws"
    try:
        return PROFILES[chosen]
    except KeyError:
        raise ValueError(f"unknown local AWS profile {chosen!r}; known: {sorted(PROFILES)}") from None
