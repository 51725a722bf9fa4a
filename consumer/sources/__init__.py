"""Where events come from: the signed webhook receiver (with its group-commit ingestor)
and Kafka. Each hands batches to the store's ingest role; how a backend spreads that work
is the backend's business."""
