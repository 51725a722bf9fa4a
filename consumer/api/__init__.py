"""The HTTP read and admin API, the probes and metrics; ``app`` assembles them with the
webhook receiver into one aiohttp application."""
