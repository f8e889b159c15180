"""The ``kfacvi`` command line.

``kfacvi train --preset NAME [--FIELD VALUE ...] [--out DIR] [--data-dir PATH] [--device cpu|cuda]``
trains a preset of :mod:`pyro_kfacvi.presets`; every :class:`~pyro_kfacvi.presets.TrainConfig`
field has an override flag (``--base-lr``, ``--lr-scale``, ``--rho``, ``--mc-samples``,
``--channels 32,64``, ``--train-subset 10000``, ...). ``kfacvi train --resume DIR`` continues a
run from its checkpoint. ``kfacvi evaluate --checkpoint PATH --test-samples S`` prints the Monte
Carlo test metrics of a checkpoint as JSON.

The data folder is ``--data-dir``, else the ``KFACVI_DATA`` environment variable.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
import types
import typing
from pathlib import Path

from .presets import FISHERS, OPTIMIZERS, PRESETS, TrainConfig

_CHOICES = {"optimizer": tuple(OPTIMIZERS), "fisher": FISHERS,
            "weight_decay_mode": ("coupled", "decoupled", "literal"), "model": ("lenet5", "resnet18")}


def _optional(parse, name):
    def parser(text):
        if text.strip().lower() in ("none", "null", ""):
            return None
        return parse(text)
    parser.__name__ = name
    return parser


def _int_tuple(text):
    try:
        return tuple(int(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64, got {text!r}") from None


def _bool(text):
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _parser_for(hint):
    """An argparse ``type`` for a TrainConfig field annotation."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _optional(_parser_for(inner), f"optional {getattr(inner, '__name__', inner)}")
    if typing.get_origin(hint) is tuple:
        return _int_tuple
    if hint is bool:
        return _bool
    return {int: int, float: float, str: str}[hint]


def add_config_overrides(parser: argparse.ArgumentParser) -> None:
    """One ``--field-name`` flag per TrainConfig field (absent from the namespace unless given)."""
    hints = typing.get_type_hints(TrainConfig)
    group = parser.add_argument_group("hyperparameter overrides (default: the preset's value)")
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        kwargs = {"dest": f"override_{field.name}", "default": argparse.SUPPRESS, "type": _parser_for(hints[field.name])}
        if field.name in _CHOICES:
            kwargs["choices"] = _CHOICES[field.name]
        else:
            kwargs["metavar"] = field.name.upper()
        if field.name in ("channels", "hidden"):
            kwargs["help"] = "LeNet5 sizes, e.g. 32,64 ('none': the network's default)"
        elif field.name in ("rho", "train_subset"):
            kwargs["help"] = "a number, or 'none'"
        group.add_argument(flag, **kwargs)


def overrides(args) -> dict:
    prefix = "override_"
    return {k[len(prefix):]: v for k, v in vars(args).items() if k.startswith(prefix)}


def config_from_args(args) -> TrainConfig:
    """The preset with the command line's overrides applied (see :meth:`TrainConfig.replace`)."""
    config = PRESETS[args.preset]
    changes = overrides(args)
    return config.replace(**changes) if changes else config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kfacvi", description="Natural-gradient VI with Kronecker-factored "
                                     "Gaussian posteriors (K-FAC, KFAC-VI, Noisy K-FAC) on CIFAR-10.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train a preset")
    train.add_argument("--preset", choices=sorted(PRESETS), help="configuration to start from")
    train.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its checkpoint")
    train.add_argument("--out", metavar="DIR", help="run folder (default: runs/PRESET-TIMESTAMP)")
    _common(train)
    add_config_overrides(train)

    ev = sub.add_parser("evaluate", help="Monte Carlo test metrics of a checkpoint (JSON on stdout)")
    ev.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint.pt or its run folder")
    ev.add_argument("--test-samples", type=int, metavar="S", help="posterior samples (default: the run's)")
    ev.add_argument("--output", metavar="FILE", help="also write the JSON here (default: RUN/evaluation-S<S>.json)")
    _common(ev)

    sub.add_parser("presets", help="list the presets as JSON")
    return parser


def _common(parser):
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--data-dir", metavar="PATH", help="folder holding cifar-10-batches-py (default: $KFACVI_DATA)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _load_data(args):
    from .data import cifar10
    return cifar10(args.data_dir, device=args.device)


def _setup(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("kfacvi: error: --device cuda but CUDA is not available")


def cmd_train(args, parser) -> int:
    from .training import Trainer, TrainingDiverged

    progress = not args.no_progress and sys.stderr.isatty()
    if args.resume:
        if args.preset or overrides(args):
            parser.error("--resume continues the checkpoint's configuration: --preset and overrides are not allowed")
        if args.out and Path(args.out).resolve() != Path(args.resume).resolve():
            parser.error("--resume writes into the resumed folder; drop --out")
        _setup(args)
        trainer = Trainer.resume(args.resume, _load_data(args), progress=progress)
    else:
        if not args.preset:
            parser.error(f"--preset is required (one of: {', '.join(sorted(PRESETS))}) unless --resume is given")
        try:
            config = config_from_args(args)
        except (ValueError, TypeError) as exc:
            parser.error(str(exc))
        out = Path(args.out) if args.out else Path("runs") / f"{args.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
        if (out / "checkpoint.pt").exists():
            parser.error(f"{out} already holds a run; use --resume {out} or another --out")
        _setup(args)
        trainer = Trainer(config, _load_data(args), out_dir=out, progress=progress)
    try:
        trainer.run()
    except TrainingDiverged as exc:
        print(f"kfacvi: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {trainer.out_dir}/metrics.json, curves.png, checkpoint.pt")
    return 0


def cmd_evaluate(args, parser) -> int:
    from .training import CHECKPOINT, Trainer, _atomic_write, _eval_seed, evaluate

    _setup(args)
    trainer = Trainer.from_checkpoint(args.checkpoint, _load_data(args))
    samples = args.test_samples if args.test_samples is not None else trainer.config.test_samples
    if samples < 0:
        parser.error("--test-samples must be >= 0 (0: the posterior mean)")
    start = time.perf_counter()
    result = {"checkpoint": str(args.checkpoint), "epoch": trainer.epoch, "iteration": trainer.engine.iteration,
              "test_samples": samples}
    result.update(evaluate(trainer.model, trainer.guide, trainer.data.test, samples,
                           _eval_seed(trainer.config.seed, None), "test_"))
    result["eval_time"] = time.perf_counter() - start
    text = json.dumps(result, indent=2)
    print(text)
    path = Path(args.checkpoint)
    run_dir = path if path.is_dir() else path.parent
    output = Path(args.output) if args.output else run_dir / f"evaluation-S{samples}.json"
    try:
        _atomic_write(output, lambda f: f.write((text + "\n").encode()))
    except OSError as exc:
        print(f"kfacvi: warning: could not write {output}: {exc}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "presets":
        print(json.dumps({name: cfg.to_dict() for name, cfg in PRESETS.items()}, indent=2))
        return 0
    from .data import DataError
    try:
        if args.command == "train":
            return cmd_train(args, parser)
        return cmd_evaluate(args, parser)
    except DataError as exc:
        print(f"kfacvi: error: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError as exc:
        print(f"kfacvi: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
