"""The built-in handlers that settings switch on, as subscriptions.

The service loads :func:`from_settings` by reference (``handlers.builtin:from_settings``,
since ``consumer`` never imports ``handlers`` statically) and adds what it returns to the
handlers named in ``PHASEWATCH_HANDLERS``:

* ``PHASEWATCH_NOTIFY_URL`` (+ ``_SECRET``, ``_PHASES``, ``_TIMEOUT_S``): :func:`http_notify`;
* ``PHASEWATCH_PUBLISH_TOPIC`` (with ``PHASEWATCH_KAFKA_*``): :func:`kafka_publish`;
* ``PHASEWATCH_LOG_CHANGES=1``: :func:`log_changes` on stdout.

The ``PHASEWATCH_DISPATCH_*`` delivery policy applies to the built-ins too.
"""

from __future__ import annotations

from consumer import Settings, Subscription, client_options
from handlers.http_notify import http_notify
from handlers.kafka_publish import kafka_publish
from handlers.log import log_changes

__all__ = ["from_settings"]


def _split(csv: str) -> list[str]:
    return [item.strip() for item in csv.split(",") if item.strip()]


def from_settings(settings: Settings) -> list[Subscription]:
    """The built-ins enabled by ``settings``, in a stable order (notify, publish, log).

    Raises ValueError, naming the variable to set, when one is enabled but incomplete.
    """
    enabled: list[Subscription] = []
    policy = settings.delivery_policy()
    if settings.notify_url:
        secret = settings.notify_secret.get_secret_value() if settings.notify_secret else ""
        if not secret:
            raise ValueError(
                "PHASEWATCH_NOTIFY_URL is set but PHASEWATCH_NOTIFY_SECRET is not: "
                "notifications are always signed; set a secret shared with the receiver "
                "(Standard Webhooks form: whsec_<base64>)"
            )
        enabled.append(
            http_notify(
                settings.notify_url,
                secret,
                phases=_split(settings.notify_phases),
                timeout_s=settings.notify_timeout_s,
                concurrency=policy.concurrency,
                max_attempts=policy.max_attempts,
                max_age_s=policy.max_age_s,
            )
        )
    if settings.publish_topic:
        if not settings.kafka_bootstrap_servers:
            raise ValueError(
                "PHASEWATCH_PUBLISH_TOPIC is set but PHASEWATCH_KAFKA_BOOTSTRAP_SERVERS is "
                "not: set the brokers to publish to"
            )
        enabled.append(
            kafka_publish(
                settings.publish_topic,
                client_options(settings.kafka_connection()),
                concurrency=policy.concurrency,
                max_attempts=policy.max_attempts,
                max_age_s=policy.max_age_s,
            )
        )
    if settings.log_changes:
        enabled.append(log_changes())
    return enabled
