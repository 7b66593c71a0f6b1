"""``python -m fxcomp`` runs the command line."""

from fxcomp.cli import main

main()
