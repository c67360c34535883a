"""Thin endpoints: they validate, then call the hub, the feed or the job store."""
