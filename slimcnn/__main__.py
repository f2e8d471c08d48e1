"""``python -m slimcnn`` runs the ``slimcnn`` command (also how torchrun starts it: ``torchrun -m slimcnn``)."""
import sys

from .cli import main

if __name__ == "__main__":  # importing the module (doctest collection, tools) must not run the command
    sys.exit(main())
