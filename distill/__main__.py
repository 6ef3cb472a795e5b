"""`python -m distill ...` (e.g. under `accelerate launch -m distill eval ...` or `torchrun -m distill ...`)."""

from distill.cli import main

main()
