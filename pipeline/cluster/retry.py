"""Retries of storage calls that can fail for a moment (an S3 503, a dropped connection).

:class:`Backoff` gives the wait before each retry: exponential from ``base_s``, capped at
``cap_s``, with "equal jitter" (half the step fixed, half uniform) so that many clients do not
retry in step; ``attempts`` calls in all before an error counts as persistent. Its random
source is a ``random.Random`` of its own (seeded in tests). :func:`retrying` runs one call
with it, blocking; :mod:`pipeline.cluster.storage` schedules per-file retries without blocking.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from pipeline.errors import UserError

T = TypeVar("T")


@dataclass
class Backoff:
    """Exponential backoff with jitter: :meth:`delay` of the n-th failure (seconds)."""

    base_s: float = 0.5
    cap_s: float = 30.0
    attempts: int = 8  # calls in all (so up to attempts - 1 retries, ~1 minute by default)
    rng: random.Random = field(default_factory=random.Random)

    def delay(self, failures: int) -> float:
        """The wait after ``failures`` (>= 1) failed calls: uniform in [step/2, step], where
        step = min(cap_s, base_s * 2 ** (failures - 1))."""
        step = min(self.cap_s, self.base_s * 2 ** (failures - 1))
        return step / 2 + self.rng.uniform(0, step / 2)

    def gives_up(self, failures: int) -> bool:
        """Whether ``failures`` failed calls make the error persistent."""
        return failures >= self.attempts


def retrying(
    call: Callable[[], T],
    what: str,
    backoff: Backoff,
    permanent: tuple[type[BaseException], ...] = (UserError,),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """``call()``, retried with ``backoff`` on any Exception but ``permanent`` ones (a user
    error: a lost lease, an unsafe key); the last error is raised once ``backoff`` gives up.
    Each retry is one warning line naming ``what``."""
    failures = 0
    while True:
        try:
            return call()
        except permanent:
            raise
        except Exception as e:
            failures += 1
            if backoff.gives_up(failures):
                raise
            wait = backoff.delay(failures)
            print(
                f"warning: {what} failed ({type(e).__name__}: {str(e)[:120]}); "
                f"retry {failures} in {wait:.1f} s",
                file=sys.stderr,
                flush=True,
            )
            sleep(wait)
