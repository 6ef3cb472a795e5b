"""``python -m app serve|api`` (the same commands as ``distill serve|api``)."""

from app.cli import main

main()
