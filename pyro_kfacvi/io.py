"""Saving a trained posterior — model, guide and engine with their configuration — in one file,
and loading it into a fresh process:

    pyro_kfacvi.save("posterior.pt", model, guide, engine)
    model, guide, engine = pyro_kfacvi.load("posterior.pt", Net())   # Net(): the architecture

The file holds plain values and tensors only, so :func:`load` reads it with
``torch.load(weights_only=True)`` and runs no code from it. For each object it holds the
configuration and the ``state_dict()``: the model's η (a number, or ``"auto"`` and the learned
value) and N, the likelihood's family and noise (the learned σ in its state), the guide's family
and ``config()`` (γ, μ, F̂ and the eigenbases in its state), and the engine's hyperparameters
(iteration and momentum in its state). The network is code, not data: :func:`load` takes an
instance of the same architecture and overwrites its parameters and buffers.

The engine's learning rate is saved when it is a number or a
:class:`~pyro_kfacvi.WarmupPolynomialLR` (its arguments); another schedule (any callable) is not
— pass it as ``lr=`` to :func:`load`. A :class:`~pyro_kfacvi.distributed.ParallelPlan` belongs to
a process and is not saved.
"""
import torch

from .curvature import CurvatureConfig
from .engine import KFACVI, Retry
from .guides import KroneckerDelta, KroneckerNormal
from .likelihoods import Categorical, Gaussian
from .model import BayesianModel
from .schedules import WarmupPolynomialLR

FORMAT = "pyro_kfacvi.save/1"
LIKELIHOODS = {cls.__name__: cls for cls in (Categorical, Gaussian)}
GUIDES = {cls.__name__: cls for cls in (KroneckerNormal, KroneckerDelta)}


def save(path, model, guide, engine=None):
    """Write ``model``, ``guide`` and (optionally) ``engine`` with their configuration to ``path``
    (a file name or a binary file object), for :func:`load`."""
    for family, known in ((type(model.likelihood).__name__, LIKELIHOODS), (type(guide).__name__, GUIDES)):
        if family not in known:
            raise TypeError(f"save() stores the families {sorted(known)}, not {family}")
    if guide.model is not model or (engine is not None and engine.guide is not guide):
        raise ValueError("the guide (and the engine) must belong to the model saved with them")
    torch.save({
        "format": FORMAT,
        "model": {"config": model.config(), "likelihood": model.likelihood.config(), "state": model.state_dict()},
        "guide": {"family": type(guide).__name__, "config": guide.config(), "state": guide.state_dict()},
        "engine": None if engine is None else {"config": {"lr": schedule_config(engine.lr), **engine.config()},
                                                "state": engine.state_dict()},
    }, path)


def load(path, net, lr=None, map_location="cpu"):
    """``(model, guide, engine)`` from a file of :func:`save` (``engine`` is ``None`` if none was
    saved), on ``net``'s device and in the saved dtype.

    :param net: an instance of the saved network's architecture; its parameters and buffers are
        overwritten by the saved ones.
    :param lr: the engine's learning rate or schedule, in place of the saved one (needed when the
        saved schedule was not a number or a ``WarmupPolynomialLR``).
    :param map_location: where ``torch.load`` puts the tensors before they are copied into the
        model, guide and engine.
    """
    saved = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} was not written by pyro_kfacvi.save (format {FORMAT})")
    state = saved["model"]["state"]
    net.to(next(t.dtype for name, t in state.items() if name.startswith("net.") and t.is_floating_point()))
    likelihood = dict(saved["model"]["likelihood"])
    model = BayesianModel(net, LIKELIHOODS[likelihood.pop("family")](**likelihood), **saved["model"]["config"])
    model.load_state_dict(state)
    guide = GUIDES[saved["guide"]["family"]](model, **saved["guide"]["config"])
    guide.load_state_dict(saved["guide"]["state"])
    if saved["engine"] is None:
        return model, guide, None
    config = dict(saved["engine"]["config"])
    config["lr"] = lr if lr is not None else schedule_from_config(config["lr"])
    config["curvature"] = CurvatureConfig(**config["curvature"])
    if isinstance(config["on_nonfinite"], dict):
        config["on_nonfinite"] = Retry(**config["on_nonfinite"])
    engine = KFACVI(model, guide, **config)
    engine.load_state_dict(saved["engine"]["state"])
    return model, guide, engine


def schedule_config(lr):
    """A number as it is, a :class:`~pyro_kfacvi.WarmupPolynomialLR` as its arguments, any other
    schedule as its name only (a function's, else its type's; it cannot be rebuilt)."""
    if not callable(lr):
        return float(lr)
    if type(lr) is WarmupPolynomialLR:
        return {"family": "WarmupPolynomialLR", **vars(lr)}
    return {"family": getattr(lr, "__qualname__", type(lr).__qualname__)}


def schedule_from_config(config):
    """The learning rate of :func:`schedule_config`."""
    if not isinstance(config, dict):
        return config
    arguments = dict(config)
    if arguments.pop("family") != "WarmupPolynomialLR":
        raise ValueError(f"the engine was saved with a learning-rate schedule of type {config['family']}, which "
                         "save() does not store: pass it to load() as lr=, or save without the engine")
    return WarmupPolynomialLR(**arguments)
