"""DeliveryPolicy: one budget for handler retries and broker redelivery.

Durable backends (Redis Streams, JetStream) read the same policy: a handler gets
at most `max_deliveries` attempts in total, counted by the broker's own delivery
counter, so retries never multiply across layers. After the last failed attempt
the event goes to the dead-letter place (see `loom_ha.deadletter`).
"""

from __future__ import annotations

from dataclasses import dataclass

from loom_ha.errors import ConfigurationError


@dataclass(frozen=True, kw_only=True)
class DeliveryPolicy:
    """How often and how fast a failing handler gets an event again.

    Attributes:
        max_deliveries: attempts in total, the first one included (>= 1).
        backoff_initial: delay before the second attempt, in seconds.
        backoff_max: the delay never grows past this.
        backoff_multiplier: each further delay is the previous one times this.
    """

    max_deliveries: int = 5
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_deliveries < 1:
            raise ConfigurationError(f"max_deliveries must be >= 1, got {self.max_deliveries}")
        if self.backoff_initial < 0 or self.backoff_max < self.backoff_initial:
            raise ConfigurationError(
                "backoff_initial must be >= 0 and <= backoff_max, got "
                f"{self.backoff_initial} and {self.backoff_max}"
            )
        if self.backoff_multiplier < 1:
            raise ConfigurationError(
                f"backoff_multiplier must be >= 1, got {self.backoff_multiplier}"
            )

    def backoff(self, deliveries_so_far: int) -> float:
        """Seconds to wait before the next attempt, after `deliveries_so_far` attempts."""
        exponent = max(0, deliveries_so_far - 1)
        return min(self.backoff_max, self.backoff_initial * self.backoff_multiplier**exponent)

    def schedule(self) -> list[float]:
        """The delay before each redelivery: `max_deliveries - 1` values (NATS BackOff)."""
        return [self.backoff(n) for n in range(1, self.max_deliveries)]

    def exhausted(self, deliveries_so_far: int) -> bool:
        """True when no attempt is left after `deliveries_so_far` failed ones."""
        return deliveries_so_far >= self.max_deliveries

    def abandoned(self, delivery: int) -> str | None:
        """Why the `delivery`-th delivery of an event goes to the dead letters unhandled, or None.

        Every durable backend asks before calling handlers: when the deliveries before this
        one were never settled (the consumer died or stalled mid-handler, e.g. on an event
        that crashes its process) and they used up the budget, the event is not handed to
        another consumer to crash it too.
        """
        earlier = delivery - 1
        if not self.exhausted(earlier):
            return None
        return (
            f"delivered {earlier} times without an ack "
            "(consumers died or stalled while handling it)"
        )
