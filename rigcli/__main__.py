"""``python -m rigcli`` runs the same CLI as the ``rig`` console script."""

from rigcli.cli import main

if __name__ == "__main__":  # not when a spawned worker (pretrain --workers) imports this module again
    main()
