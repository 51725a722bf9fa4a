"""The SQLite backend: the store, its schema and rows, the writer process that gives
ingestion a core of its own, and the planner that lets a caller fold ahead of it."""
