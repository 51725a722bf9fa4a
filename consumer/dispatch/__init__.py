"""Delivering recorded changes to handlers: the subscription seam, the delivery policy,
the dispatcher (per-handler queues, retries, dead letters, the outbox split into lanes
that replicas share through leases), the lane assignment and handler loading."""
