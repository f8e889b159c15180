"""The CIFAR-10 application built on the core library: data, the reference networks, the paper's
presets, the training loop with checkpoints, evaluation, baselines, the uncertainty analysis
(dataset shift, OOD, plots) and the ``kfacvi`` command line.

Nothing in :mod:`pyro_kfacvi` imports this package."""
