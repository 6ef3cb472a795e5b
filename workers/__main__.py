"""``python -m workers serve|api|worker|migrate-db`` (the same commands as ``distill ...``)."""

from workers.cli import main

main()
