"""``python -m slimcnn`` runs the ``slimcnn`` command (also how torchrun starts it: ``torchrun -m slimcnn``)."""
import sys

from .cli import main

sys.exit(main())
