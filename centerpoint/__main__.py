"""`python -m centerpoint` runs the CLI."""

from cli.main import main

main()
