"""`python -m bsharedrag` is the `bsharedrag` command (launchers such as torchrun take a module)."""

from .cli import main

main()
