"""Publish: MQTT contract v1 (topics and payloads), the ordered outbox with its on-disk spool,
and the broker connection."""
