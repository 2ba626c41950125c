"""Entry point: ``python cli.py fit --config configs/quickstart.yaml`` (same as the ``er-lightning`` command)."""

from er_lightning.cli import main

if __name__ == "__main__":
    main()
