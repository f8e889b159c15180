"""``python -m pyro_kfacvi ...`` runs the ``kfacvi`` command line."""
import sys

from .cli import main

sys.exit(main())
