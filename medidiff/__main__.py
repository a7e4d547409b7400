"""``python -m medidiff`` (also what ``torchrun -m medidiff`` runs)."""

import sys

from medidiff.cli import main

sys.exit(main())
