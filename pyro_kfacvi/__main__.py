"""``python -m pyro_kfacvi ...`` runs the ``kfacvi`` command line (:mod:`pyro_kfacvi.experiments.cli`)."""
import sys

from .experiments.cli import main

sys.exit(main())
