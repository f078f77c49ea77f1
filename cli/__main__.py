"""`python -m cli ...` runs the `tuneloop` command."""

from cli.main import main

main()
