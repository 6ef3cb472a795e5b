"""``python -m workers worker|migrate-db`` (the same commands as ``distill worker|migrate-db``)."""

from workers.cli import main

main()
