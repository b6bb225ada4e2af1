"""tunelab as a service: an OpenAI-compatible fine-tuning job API, driven by the official `openai` client.

`api/` translates HTTP; `jobs.py`, `files.py` and `models.py` hold the rules (state machine, validation, what may be
deleted); `store/` holds every query, one repository per kind of object (SQLAlchemy: SQLite in WAL mode by default,
PostgreSQL by URL), on tables that `migrations/` upgrades at start; `worker.py` runs jobs in separate processes under
leases with heartbeats; `supervisor.py` starts the API and the workers; `cli.py` is `tunelab service`.
"""
