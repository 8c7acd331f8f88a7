"""The table of systems: name -> how to build it, which data it reads, its default loss.

Adding a system means one model file in ``models/`` and one row here.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Callable

from inference import data as data_module
from models.common import GenlabError


def _int_list(text: str, minimum: int = 1) -> list:
    try:
        values = [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        kind = "positive" if minimum == 1 else f"at least {minimum}"
        raise argparse.ArgumentTypeError(f"expected integers {kind}, got {text!r}")
    return values


def epoch_list(text: str) -> list:
    """Epoch numbers, 0 (before training) allowed."""
    return _int_list(text, minimum=0)


@dataclass
class System:
    name: str
    help: str
    build_model: Callable  # (system_args: dict) -> nn.Module with .model and .guide
    resolve: Callable  # (given system_args: dict) -> the full, recorded system_args
    load: Callable  # (data_args: dict, data_dir) -> inference.data.Dataset
    default_loss: str
    system_options: list = field(default_factory=list)  # (flag, kwargs, default)
    data_options: list = field(default_factory=list)
    resolve_data: Callable = dict  # (given data_args: dict) -> the full, recorded data_args

    def build(self, cfg):
        return self.build_model(dict(cfg.system_args))

    def load_data(self, cfg, download: bool = True):
        return self.load(dict(cfg.data_args), cfg.data_dir, download)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        for flag, kwargs, _ in self.system_options + self.data_options:
            parser.add_argument(flag, default=None, **kwargs)

    def option_names(self) -> tuple:
        def d(opts):
            return [flag.lstrip("-").replace("-", "_") for flag, _, _ in opts]

        return d(self.system_options), d(self.data_options)

    def data_defaults(self) -> dict:
        return {flag.lstrip("-").replace("-", "_"): dflt for flag, _, dflt in self.data_options}


def _build_vae(args: dict):
    from models.vae import build_vae

    return build_vae(**args)


def _resolve_vae(args: dict) -> dict:
    from models.vae import vae_args

    return vae_args(**args)


def _load_images(args: dict, data_dir, download=True):
    return data_module.load_images(args.get("dataset", "mnist"), args.get("binarization"),
                                   data_dir, download, args.get("holdout"),
                                   args.get("holdout_fraction") or 0.05)


def _resolve_images(args: dict) -> dict:
    dataset = args.get("dataset") or "mnist"
    default = "larochelle" if dataset == "binarized-mnist" else "dynamic"
    out = {"dataset": dataset, "binarization": args.get("binarization") or default}
    if args.get("holdout"):
        out.update(holdout=args["holdout"], holdout_fraction=args.get("holdout_fraction") or 0.05)
    return out


_IMAGE_DATA = [
    ("--dataset", dict(choices=data_module.DATASETS, help="mnist (grey levels, binarized as "
                       "--binarization says) or binarized-mnist (Larochelle's fixed set)"), "mnist"),
    ("--binarization", dict(choices=data_module.BINARIZATIONS,
                            help="dynamic (default for mnist), fixed, threshold; larochelle for binarized-mnist"),
     None),
    ("--holdout", dict(choices=data_module.HOLDOUTS, help="train without the top / bottom "
                       "fraction of training images along the first principal component; they "
                       "become the evaluation split 'holdout'"), None),
    ("--holdout-fraction", dict(type=float, help="share held out by --holdout (default 0.05)"),
     None),
]

SYSTEMS = {
    "vae": System(
        name="vae",
        help="Bernoulli-pixel VAE on binarized MNIST (models/vae.py)",
        build_model=_build_vae,
        resolve=_resolve_vae,
        load=_load_images,
        default_loss="Trace_ELBO",
        system_options=[
            ("--preset", dict(help="study-d4, study-d20 or iwae-1layer (784-200-200-50 tanh)"), None),
            ("--latent-dim", dict(type=int, help="latent dimension d (default 20)"), None),
            ("--hidden", dict(type=_int_list, help="hidden sizes, e.g. 400 or 200,200 (default 400)"), None),
            ("--activation", dict(help="relu (default), tanh, softplus or elu"), None),
        ],
        data_options=_IMAGE_DATA,
        resolve_data=_resolve_images,
    ),
}


def _build_cvae(args: dict):
    from models.cvae import build_cvae

    return build_cvae(**args)


def _load_labelled_images(args: dict, data_dir, download=True):
    if args.get("dataset", "mnist") != "mnist":
        raise GenlabError("the conditional VAE needs labels: use --dataset mnist "
                          "(binarized-mnist has no labels)")
    return _load_images(args, data_dir, download)


SYSTEMS["cvae"] = System(
    name="cvae",
    help="conditional VAE p(x | y) with the label as an observed covariate (models/cvae.py)",
    build_model=_build_cvae,
    resolve=_resolve_vae,
    load=_load_labelled_images,
    default_loss="Trace_ELBO",
    system_options=SYSTEMS["vae"].system_options,
    data_options=_IMAGE_DATA,
    resolve_data=_resolve_images,
)


def get_system(name: str) -> System:
    if name not in SYSTEMS:
        raise GenlabError(f"unknown system {name!r}; choose one of {', '.join(SYSTEMS)}")
    return SYSTEMS[name]
