"""Kafka, the only package that imports aiokafka: connection options, the consumer-group
source with its dead-letter topic, the producers, and the time-window replay."""
