"""Where events go: Pulsar and PostgreSQL (durable, spooled on failure) and Redis (cache)."""
