"""``python -m rigcli`` runs the same CLI as the ``rig`` console script."""

from rigcli.cli import main

main()
