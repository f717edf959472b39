"""``python -m hmtconv`` (and ``torchrun -m hmtconv``)."""
import sys

from .cli import main

sys.exit(main())
