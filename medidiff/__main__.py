"""``python -m medidiff`` (also what ``torchrun -m medidiff`` runs)."""

import sys

from medidiff.cli.main import main

if __name__ == "__main__":  # not when a spawned worker process imports it
    sys.exit(main())
