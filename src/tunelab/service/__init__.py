"""tunelab as a service: an OpenAI-compatible fine-tuning job API, driven by the official `openai` client.

`api/` translates HTTP; `jobs.py` and `files.py` hold the rules (state machine, validation); `store.py` holds every
query (SQLAlchemy: SQLite in WAL mode by default, PostgreSQL by URL); `worker.py` runs jobs in separate processes
under leases with heartbeats; `supervisor.py` starts the API and the workers; `cli.py` is `tunelab service`.
"""
