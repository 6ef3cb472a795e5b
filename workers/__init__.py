"""Job execution: the job store (SQLAlchemy + Alembic), claiming, heartbeats and cancellation, the local
worker processes behind ``distill serve``, the Ray executor, and the glue that runs a job to an archive."""
