"""Delivering recorded changes to handlers: the subscription seam, the delivery policy,
the dispatcher (lanes, retries, dead letters, the dispatch lease) and handler loading."""
