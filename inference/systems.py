"""The table of systems: name -> how to build it, which data it reads, its default loss.

Adding a system means one model file in ``models/`` and one row here.
"""

from __future__ import annotations

import argparse
import importlib
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


def _lazy(module: str, name: str) -> Callable:
    """``module.name(**args)``, imported on first call, so the table imports no model code."""

    def call(args: dict):
        return getattr(importlib.import_module(module), name)(**args)

    call.__qualname__ = f"{module}.{name}"
    return call


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
    #: The batch contract: the model's and guide's positional arguments, by the name of the
    #: data field that holds each (``inference.data.Split``: ``x``, ``y``); batches yield
    #: exactly these, in this order, and the runner adds ``data_size=N`` as a keyword.
    inputs: tuple = ("x",)

    def model_inputs(self, split, idx=None, generator=None) -> tuple:
        """The model's positional arguments for ``split`` (datapoints ``idx``, or all)."""
        return split.batch(idx, generator, self.inputs)

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


_build_vae = _lazy("models.vae", "build_vae")


_resolve_vae = _lazy("models.vae", "vae_args")


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
        inputs=("x",),
    ),
}


# ----------------------------------------------------------------------------- hetero (issue 7)
_build_hetero = _lazy("models.hetero", "build_hetero")


_resolve_hetero = _lazy("models.hetero", "hetero_args")


def _load_regression(args: dict, data_dir=None, download=True):
    if args.get("csv"):
        return data_module.load_xy_csv(args["csv"], seed=args.get("data_seed") or 0)
    size = {k: d if args.get(k) is None else args[k]
            for k, d in (("n_train", 500), ("n_valid", 500), ("n_test", 1000))}
    return data_module.make_wiggles(**size, seed=args.get("data_seed") or 0)


def _resolve_regression(args: dict) -> dict:
    from pathlib import Path

    seed = 0 if args.get("data_seed") is None else args["data_seed"]
    if args.get("csv"):
        return {"csv": str(Path(args["csv"]).expanduser().resolve()), "data_seed": seed}
    size = {k: d if args.get(k) is None else args[k]
            for k, d in (("n_train", 500), ("n_valid", 500), ("n_test", 1000))}
    return {"dataset": "wiggles", **size, "data_seed": seed}


SYSTEMS["hetero"] = System(
    name="hetero",
    help="1-D regression with a learned noise scale: homo-, heteroscedastic, Bayesian (models/hetero.py)",
    build_model=_build_hetero,
    resolve=_resolve_hetero,
    load=_load_regression,
    default_loss="Trace_ELBO",
    system_options=[
        ("--variant", dict(choices=("homo", "hetero", "bayes"),
                           help="homo: one learned sigma; hetero (default): sigma(x) from a "
                                "second network; bayes: hetero with priors on all weights"), None),
        ("--hidden", dict(type=_int_list, help="hidden sizes of f and g (default 50,50)"), None),
        ("--activation", dict(help="tanh (default), relu, softplus or elu"), None),
        ("--sigma-floor", dict(type=float, help="sigma = softplus(.) + floor (default 1e-6, a "
                               "numerical guard; e.g. 0.05 as a remedy for the dips)"), None),
        ("--beta", dict(type=float, help="beta-NLL exponent in [0, 1] for --variant hetero "
                        "(default 0: maximum likelihood)"), None),
        ("--prior-scale", dict(type=float, help="prior sd of every weight, --variant bayes "
                               "(default 1)"), None),
    ],
    data_options=[
        ("--csv", dict(help="a CSV of two numeric columns x, y (default: the wiggles generator)"),
         None),
        ("--n-train", dict(type=int, help="wiggles training points (default 500)"), None),
        ("--n-valid", dict(type=int, help="wiggles validation points (default 500)"), None),
        ("--n-test", dict(type=int, help="wiggles test points (default 1000)"), None),
        ("--data-seed", dict(type=int, help="seed of the wiggles draw or the CSV split (default 0)"),
         None),
    ],
    resolve_data=_resolve_regression,
    inputs=("x", "y"),
)


# ----------------------------------------------------------------------------- dirichlet, meta (issue 6)
@dataclass
class DataAwareSystem(System):
    """A system whose model also reads the data options: ``build_model(system_args, data_args)``
    (the conjugate model's prior is the data's law; the GRU's vocabulary is the data's)."""

    def build(self, cfg):
        return self.build_model(dict(cfg.system_args), dict(cfg.data_args))


def _floats(text: str) -> list:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


def _resolve_symbol_data(args: dict, defaults: dict) -> dict:
    out = {k: (defaults[k] if args.get(k) is None else args[k]) for k in defaults}
    from models.dirichlet import check_alpha

    if out.get("alpha") is not None:
        out["alpha"] = check_alpha(out["alpha"]).tolist()
    return out


_DIRICHLET_DATA = dict(alpha=[1.3, 1.3, 1.3], symbols=100, sequences=1, p=None, test_symbols=None,
                       data_seed=0)
_META_DATA = dict(alpha=[1.3, 1.3, 1.3], period=5, p=None, length=100, sequences=6400,
                  valid_sequences=1000, test_sequences=1000, data_seed=0)


def _build_dirichlet(args: dict, data_args: dict):
    from models.dirichlet import DirichletCategorical

    return DirichletCategorical(data_args["alpha"], data_args["sequences"])


def _load_dirichlet(args: dict, data_dir=None, download=True):
    return data_module.load_dirichlet(args["alpha"], args["symbols"], args["sequences"], args["p"],
                                      args["test_symbols"], args["data_seed"])


def _build_meta(args: dict, data_args: dict):
    from models.meta import build_meta

    law = data_args.get("p") or data_args["alpha"]
    return build_meta(**(args | {"num_symbols": len(law)}))


def _resolve_meta(args: dict) -> dict:
    from models.meta import meta_args

    return {k: v for k, v in meta_args(**args).items() if k != "num_symbols"}


def _load_meta(args: dict, data_dir=None, download=True):
    return data_module.load_sequences(args["alpha"], args["period"], args["p"], args["length"],
                                      args["sequences"], args["valid_sequences"],
                                      args["test_sequences"], args["data_seed"])


SYSTEMS["dirichlet"] = DataAwareSystem(
    name="dirichlet",
    help="Dirichlet-Categorical conjugate model, S sequences with one p each (models/dirichlet.py)",
    build_model=_build_dirichlet,
    resolve=lambda args: {},
    load=_load_dirichlet,
    default_loss="Trace_ELBO",
    data_options=[
        ("--alpha", dict(type=_floats, help="prior concentration, also the law of the true p's "
                         "(default 1.3,1.3,1.3)"), _DIRICHLET_DATA["alpha"]),
        ("--symbols", dict(type=int, help="training symbols per sequence (default 100)"), 100),
        ("--sequences", dict(type=int, help="independent sequences S, each with its own p "
                             "(default 1)"), 1),
        ("--p", dict(type=_floats, help="a fixed true p for every sequence instead of draws "
                     "from Dirichlet(alpha)"), None),
        ("--test-symbols", dict(type=int, help="valid and test symbols per sequence (default "
                                "--symbols)"), None),
        ("--data-seed", dict(type=int, help="seed of the data draws (default 0)"), 0),
    ],
    resolve_data=lambda args: _resolve_symbol_data(args, _DIRICHLET_DATA),
    inputs=("x", "y"),  # symbols and the sequence each belongs to
)

SYSTEMS["meta"] = DataAwareSystem(
    name="meta",
    help="GRU meta-learner of reset-every-T symbol sequences, maximum likelihood (models/meta.py)",
    build_model=_build_meta,
    resolve=_resolve_meta,
    load=_load_meta,
    default_loss="Trace_ELBO",
    system_options=[
        ("--hidden", dict(type=int, help="GRU state size (default 32)"), None),
        ("--head", dict(type=_int_list, help="hidden sizes of the output MLP (default 64)"), None),
        ("--activation", dict(help="relu (default), tanh, softplus or elu"), None),
    ],
    data_options=[
        ("--period", dict(type=int, help="reset period T (default 5)"), 5),
        ("--alpha", dict(type=_floats, help="Dirichlet law of each block's p (default "
                         "1.3,1.3,1.3)"), _META_DATA["alpha"]),
        ("--p", dict(type=_floats, help="train on a fixed p instead (fixed-p mode)"), None),
        ("--length", dict(type=int, help="sequence length L (default 100)"), 100),
        ("--sequences", dict(type=int, help="training sequences (default 6400 = 50 batches of "
                             "128)"), 6400),
        ("--valid-sequences", dict(type=int, help="validation sequences (default 1000)"), 1000),
        ("--test-sequences", dict(type=int, help="test sequences (default 1000)"), 1000),
        ("--data-seed", dict(type=int, help="seed of the data draws (default 0)"), 0),
    ],
    resolve_data=lambda args: _resolve_symbol_data(args, _META_DATA),
    inputs=("x",),
)


_build_cvae = _lazy("models.cvae", "build_cvae")


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
    inputs=("x", "y"),  # images and their labels (the covariate)
)


# ----------------------------------------------------------------------------- pixelrnn (issue 8)
_build_pixelrnn = _lazy("models.pixelrnn", "build_pixelrnn")


_resolve_pixelrnn = _lazy("models.pixelrnn", "pixelrnn_args")


SYSTEMS["pixelrnn"] = System(
    name="pixelrnn",
    help="autoregressive pixel GRU, exact likelihood, empty guide (models/pixelrnn.py)",
    build_model=_build_pixelrnn,
    resolve=_resolve_pixelrnn,
    load=_load_images,
    default_loss="Trace_ELBO",
    system_options=[
        ("--hidden", dict(type=int, help="GRU state size H (default 32, the study's)"), None),
        ("--head", dict(type=_int_list, help="hidden sizes of the output MLP (default 64)"), None),
    ],
    data_options=_IMAGE_DATA,
    resolve_data=_resolve_images,
    inputs=("x",),
)


def get_system(name: str) -> System:
    if name not in SYSTEMS:
        raise GenlabError(f"unknown system {name!r}; choose one of {', '.join(SYSTEMS)}")
    return SYSTEMS[name]
