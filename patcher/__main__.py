"""`python -m patcher` runs the CLI."""

from patcher.cli import main

main()
