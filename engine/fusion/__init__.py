"""The Fusion orchestration service (spec §3): runs stored in SQLite, composed workflows
with versions, capability discovery, and the service the HTTP routes call."""
