"""`python -m slimlm` runs the CLI (used under `accelerate launch -m slimlm distill ...`)."""

from slimlm.cli import main

main()
