"""The HTTP API and worker queue. Not built yet (see the README's status section)."""
