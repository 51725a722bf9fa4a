"""The built-in handlers that settings switch on, as subscriptions.

The service loads :func:`from_settings` by reference (``handlers.builtin:from_settings``,
since ``consumer`` never imports ``handlers`` statically) and adds what it returns to the
handlers named in ``PHASEWATCH_HANDLERS``:

* ``PHASEWATCH_NOTIFY_URL`` (+ ``_SECRET``, ``_PHASES``, ``_TIMEOUT_S``): :func:`http_notify`;
* ``PHASEWATCH_PUBLISH_TOPIC`` (with ``PHASEWATCH_KAFKA_*``): :func:`kafka_publish`;
* ``PHASEWATCH_LOG_CHANGES=1``: :func:`log_changes` on stdout.

Stale alerts (``kind="stale"``, see :func:`handlers.on`'s ``stale_for``):
``PHASEWATCH_NOTIFY_STALE=running:300,...`` adds them to the notifier (which needs its
URL); ``PHASEWATCH_LOG_STALE=...`` to the log, or, without ``PHASEWATCH_LOG_CHANGES``,
makes a log of those alerts alone.

The ``PHASEWATCH_DISPATCH_*`` delivery policy applies to the built-ins too.
"""

from __future__ import annotations

from consumer import Settings, Subscription, client_options
from handlers.http_notify import http_notify
from handlers.kafka_publish import kafka_publish
from handlers.log import log_changes
from handlers.subscribe import with_stale

__all__ = ["from_settings"]


def _split(csv: str) -> list[str]:
    return [item.strip() for item in csv.split(",") if item.strip()]


def from_settings(settings: Settings) -> list[Subscription]:
    """The built-ins enabled by ``settings``, in a stable order (notify, publish, log).

    Raises ValueError, naming the variable to set, when one is enabled but incomplete.
    """
    enabled: list[Subscription] = []
    policy = settings.delivery_policy()
    notify_stale = settings.notify_stale_for()
    if notify_stale and not settings.notify_url:
        raise ValueError(
            "PHASEWATCH_NOTIFY_STALE is set but PHASEWATCH_NOTIFY_URL is not: set the URL "
            "to notify (and PHASEWATCH_NOTIFY_SECRET)"
        )
    if settings.notify_url:
        secret = settings.notify_secret.get_secret_value() if settings.notify_secret else ""
        if not secret:
            raise ValueError(
                "PHASEWATCH_NOTIFY_URL is set but PHASEWATCH_NOTIFY_SECRET is not: "
                "notifications are always signed; set a secret shared with the receiver "
                "(Standard Webhooks form: whsec_<base64>)"
            )
        notifier = http_notify(
            settings.notify_url,
            secret,
            phases=_split(settings.notify_phases),
            timeout_s=settings.notify_timeout_s,
            concurrency=policy.concurrency,
            max_attempts=policy.max_attempts,
            max_age_s=policy.max_age_s,
        )
        enabled.append(with_stale(notifier, notify_stale))
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
    log_stale = settings.log_stale_for()
    if settings.log_changes or log_stale:
        enabled.append(with_stale(log_changes(), log_stale, stale_only=not settings.log_changes))
    return enabled
