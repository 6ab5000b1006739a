"""The reconnect delay policy: exponential growth, full jitter, a cap, and a reset after health.

Pure arithmetic on an injected random source, so a seeded test can assert every delay exactly; the
caller does the sleeping.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(slots=True)
class Backoff:
    """Delays for one supervisor's reconnects.

    Full jitter (a uniform draw below the exponential ceiling) spreads out factions that failed in the
    same second, so a region-wide blip does not make every faction rejoin together and trip
    Supabase's joins-per-second limit (protocol reference 10, 11).
    """

    initial_s: float
    max_s: float
    rng: random.Random = field(default_factory=random.Random)
    failures: int = 0

    def ceiling(self) -> float:
        # Capping the exponent keeps 2**failures finite however long an outage lasts.
        return min(self.max_s, self.initial_s * 2.0 ** min(self.failures, 64))

    def next_delay(self) -> float:
        delay = self.rng.uniform(0.0, self.ceiling())
        self.failures += 1
        return delay

    def capped_delay(self) -> float:
        """For refusals that retrying soon cannot fix (a wrong key): near the cap, still jittered.

        Half-to-full of the cap rather than full jitter, so a refused key is never hammered.
        """
        self.failures += 1
        return self.rng.uniform(self.max_s / 2, self.max_s)

    def reset(self) -> None:
        self.failures = 0
