"""The HTTP API (FastAPI): thin routes over the job store in ``workers``, pydantic schemas at the edge."""
