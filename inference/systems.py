"""The table of systems: name -> how to build it, which data it reads, its default loss.

A system is a model/guide pair trained by the one runner.  Adding one means (a test checks
each of these exists for every row):

1. ``models/<name>.py``: the model/guide pair and a config dataclass of its options (the one
   source of their defaults), plus ``<name>_args(**given) -> dict`` filling them in;
2. a row here: the config classes, the builder, the data loader and the batch contract
   (``inputs``: which data fields the model takes, in order);
3. ``evaluation/reports/<name>.py`` with ``report(...)`` and its ``Options`` dataclass;
4. ``docs/<doc>``, ``notebooks/<notebook>`` (built by ``notebooks/build_*.py``) and
   ``tests/test_<name>.py``.

The training command line's flags and help are generated from the config dataclasses
(:func:`add_config_arguments`); ``config.json`` records the resolved values.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Optional

from inference import data as data_module
from models import cvae, dirichlet, hetero, iwae, meta, pixelrnn, vae
from models.common import GenlabError, config_defaults


# ----------------------------------------------------------------------------- flags from configs
def int_list(text: str, minimum: int = 1) -> list:
    """Comma-separated integers, each at least ``minimum``."""
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
    return int_list(text, minimum=0)


def float_list(text: str) -> list:
    try:
        values = [float(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    return values


#: A config field's annotation -> the argparse type that parses its flag.
_PARSERS = {"int": int, "float": float, "str": str, "bool": None,
            "list[int]": int_list, "list[float]": float_list}


def _parser_for(annotation: str):
    ann = annotation.replace(" ", "")
    if ann.startswith("Optional[") and ann.endswith("]"):
        ann = ann[len("Optional["):-1]
    if ann not in _PARSERS:
        raise TypeError(f"no command-line parser for a config field of type {annotation}")
    return _PARSERS[ann]


def _show(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def add_config_arguments(parser: argparse.ArgumentParser, cls, skip=()) -> None:
    """One flag per field of the config dataclass ``cls``: ``--field-name``, parsed by the
    field's type, its help followed by "(default X)" from the field's default.  Every flag
    defaults to None, so a caller can tell which were given (``--resume`` needs that)."""
    defaults = config_defaults(cls)
    for f in fields(cls):
        if f.name in skip:
            continue
        kwargs = dict(default=None, help=f.metadata.get("help", ""))
        if defaults[f.name] not in (None, []):
            kwargs["help"] += f" (default {_show(defaults[f.name])})"
        if f.metadata.get("choices"):
            kwargs["choices"] = tuple(f.metadata["choices"])
        parse = f.metadata.get("parse") or _parser_for(str(f.type))  # annotations are strings
        if parse is None:  # a switch: --flag sets True (a True default gets --no-flag too)
            kwargs["action"] = ("store_const" if defaults[f.name] is False
                                else argparse.BooleanOptionalAction)
            if defaults[f.name] is False:
                kwargs["const"] = True
                kwargs["help"] = f.metadata.get("help", "")
        elif parse is not str:
            kwargs["type"] = parse
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


# ----------------------------------------------------------------------------- the row
@dataclass
class System:
    name: str
    help: str
    model_file: str  # models/<file>.py
    system_config: Optional[type]  # the config dataclass of the model's options
    data_config: type  # the config dataclass of the data options (inference.data)
    build_model: Callable  # (system_args: dict, data_args: dict) -> nn.Module with .model/.guide
    resolve: Callable  # (given system_args: dict) -> the full, recorded system_args
    resolve_data: Callable  # (given data_args: dict) -> the full, recorded data_args
    load: Callable  # (data_args: dict, data_dir, download) -> inference.data.Dataset
    #: The batch contract: the model's and guide's positional arguments, by the name of the
    #: data field that holds each (``inference.data.Split``: ``x``, ``y``); batches yield
    #: exactly these, in this order, and the runner adds ``data_size=N`` as a keyword.
    inputs: tuple
    doc: str  # docs/<doc>
    notebook: str  # notebooks/<notebook>
    default_loss: str = "Trace_ELBO"
    report: Optional[str] = None  # evaluation.reports.<report>; default: the system's name

    def build(self, cfg):
        return self.build_model(dict(cfg.system_args), dict(cfg.data_args))

    def load_data(self, cfg, download: bool = True):
        return self.load(dict(cfg.data_args), cfg.data_dir, download)

    def model_inputs(self, split, idx=None, generator=None) -> tuple:
        """The model's positional arguments for ``split`` (datapoints ``idx``, or all)."""
        return split.batch(idx, generator, self.inputs)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        if self.system_config is not None:
            add_config_arguments(parser, self.system_config)
        add_config_arguments(parser, self.data_config,
                             skip=[f.name for f in self._system_fields()])

    def _system_fields(self):
        return fields(self.system_config) if self.system_config is not None else ()

    def option_names(self) -> tuple:
        sys_names = [f.name for f in self._system_fields()]
        return sys_names, [f.name for f in fields(self.data_config) if f.name not in sys_names]

    def data_defaults(self) -> dict:
        return config_defaults(self.data_config)


# ----------------------------------------------------------------------------- images
def _load_images(args: dict, data_dir, download=True):
    d = config_defaults(data_module.ImageData)
    return data_module.load_images(args.get("dataset", d["dataset"]), args.get("binarization"),
                                   data_dir, download, args.get("holdout"),
                                   args.get("holdout_fraction") or d["holdout_fraction"])


def _resolve_images(args: dict) -> dict:
    d = config_defaults(data_module.ImageData)
    dataset = args.get("dataset") or d["dataset"]
    default = "larochelle" if dataset == "binarized-mnist" else "dynamic"
    out = {"dataset": dataset, "binarization": args.get("binarization") or default}
    if args.get("holdout"):
        out.update(holdout=args["holdout"],
                   holdout_fraction=args.get("holdout_fraction") or d["holdout_fraction"])
    return out


def _load_labelled_images(args: dict, data_dir, download=True):
    if args.get("dataset", "mnist") != "mnist":
        raise GenlabError("the conditional VAE needs labels: use --dataset mnist "
                          "(binarized-mnist has no labels)")
    return _load_images(args, data_dir, download)


# ----------------------------------------------------------------------------- regression
def _load_regression(args: dict, data_dir=None, download=True):
    args = {k: v for k, v in args.items() if k != "dataset"}
    d = _resolve_regression(args)
    if d.get("csv"):
        return data_module.load_xy_csv(d["csv"], seed=d["data_seed"])
    return data_module.make_wiggles(d["n_train"], d["n_valid"], d["n_test"], seed=d["data_seed"])


def _resolve_regression(args: dict) -> dict:
    d = config_defaults(data_module.RegressionData)
    seed = d["data_seed"] if args.get("data_seed") is None else args["data_seed"]
    if args.get("csv"):
        return {"csv": str(Path(args["csv"]).expanduser().resolve()), "data_seed": seed}
    size = {k: d[k] if args.get(k) is None else args[k] for k in ("n_train", "n_valid", "n_test")}
    return {"dataset": "wiggles", **size, "data_seed": seed}


# ----------------------------------------------------------------------------- symbols
def _resolve_symbols(cls) -> Callable:
    def resolve(args: dict) -> dict:
        d = config_defaults(cls)
        out = {k: (d[k] if args.get(k) is None else args[k]) for k in d}
        if out.get("alpha") is not None:  # recorded as the model holds it (float32 values)
            out["alpha"] = dirichlet.check_alpha(out["alpha"]).tolist()
        return out

    return resolve


def _build_dirichlet(args: dict, data_args: dict):
    return dirichlet.DirichletCategorical(data_args["alpha"], data_args["sequences"])


def _load_dirichlet(args: dict, data_dir=None, download=True):
    return data_module.load_dirichlet(args["alpha"], args["symbols"], args["sequences"], args["p"],
                                      args["test_symbols"], args["data_seed"])


def _build_meta(args: dict, data_args: dict):
    law = data_args.get("p") or data_args["alpha"]
    return meta.build_meta(**(args | {"num_symbols": len(law)}))


def _resolve_meta(args: dict) -> dict:
    return {k: v for k, v in meta.meta_args(**args).items() if k != "num_symbols"}


def _load_meta(args: dict, data_dir=None, download=True):
    return data_module.load_sequences(args["alpha"], args["period"], args["p"], args["length"],
                                      args["sequences"], args["valid_sequences"],
                                      args["test_sequences"], args["data_seed"])


def _only_system_args(build: Callable) -> Callable:
    """A builder of the table's shape from one that takes only the system arguments."""
    return lambda args, data_args: build(**args)


def _keywords(resolve: Callable) -> Callable:
    return lambda args: resolve(**args)


SYSTEMS = {
    "vae": System(
        name="vae", help="Bernoulli-pixel VAE on binarized MNIST (models/vae.py)",
        model_file="vae.py", system_config=vae.VAEConfig,
        data_config=data_module.ImageData,
        build_model=_only_system_args(vae.build_vae),
        resolve=_keywords(vae.vae_args), resolve_data=_resolve_images,
        load=_load_images, inputs=("x",), doc="vae.md", notebook="vae_mnist.ipynb"),
    "hetero": System(
        name="hetero", help="1-D regression with a learned noise scale: homo-, "
        "heteroscedastic, Bayesian (models/hetero.py)",
        model_file="hetero.py", system_config=hetero.HeteroConfig,
        data_config=data_module.RegressionData,
        build_model=_only_system_args(hetero.build_hetero),
        resolve=_keywords(hetero.hetero_args), resolve_data=_resolve_regression,
        load=_load_regression, inputs=("x", "y"), doc="heteroscedastic_regression.md",
        notebook="heteroscedastic_regression.ipynb"),
    "dirichlet": System(
        name="dirichlet", help="Dirichlet-Categorical conjugate model, S sequences with one p "
        "each (models/dirichlet.py)",
        model_file="dirichlet.py", system_config=None, data_config=data_module.DirichletData,
        build_model=_build_dirichlet, resolve=lambda args: {},
        resolve_data=_resolve_symbols(data_module.DirichletData), load=_load_dirichlet,
        inputs=("x", "y"),  # symbols and the sequence each belongs to
        doc="dirichlet_categorical.md", notebook="dirichlet_categorical.ipynb"),
    "meta": System(
        name="meta", help="GRU meta-learner of reset-every-T symbol sequences, maximum "
        "likelihood (models/meta.py)",
        model_file="meta.py", system_config=meta.MetaConfig,
        data_config=data_module.SequenceData, build_model=_build_meta, resolve=_resolve_meta,
        resolve_data=_resolve_symbols(data_module.SequenceData), load=_load_meta,
        inputs=("x",), doc="dirichlet_categorical.md", notebook="dirichlet_categorical.ipynb"),
    "cvae": System(
        name="cvae", help="conditional VAE p(x | y) with the label as an observed covariate "
        "(models/cvae.py)",
        model_file="cvae.py", system_config=vae.VAEConfig,
        data_config=data_module.ImageData,
        build_model=_only_system_args(cvae.build_cvae),
        resolve=_keywords(vae.vae_args), resolve_data=_resolve_images,
        load=_load_labelled_images, inputs=("x", "y"),  # images and their labels (the covariate)
        doc="cvae.md", notebook="cvae_mnist.ipynb"),
    "pixelrnn": System(
        name="pixelrnn", help="autoregressive pixel GRU, exact likelihood, empty guide "
        "(models/pixelrnn.py)",
        model_file="pixelrnn.py", system_config=pixelrnn.PixelRNNConfig,
        data_config=data_module.ImageData,
        build_model=_only_system_args(pixelrnn.build_pixelrnn),
        resolve=_keywords(pixelrnn.pixelrnn_args), resolve_data=_resolve_images,
        load=_load_images, inputs=("x",), doc="pixel_rnn.md",
        notebook="pixel_rnn_inpainting.ipynb"),
    "vae2": System(
        name="vae2", help="two-stochastic-layer VAE of the IWAE paper, "
        "784-200-200-z1(100)-100-100-z2(50) tanh (models/iwae.py)",
        model_file="iwae.py", system_config=iwae.IWAE2Config,
        data_config=data_module.ImageData,
        build_model=_only_system_args(iwae.build_iwae2),
        resolve=_keywords(iwae.iwae2_args), resolve_data=_resolve_images,
        load=_load_images, inputs=("x",), doc="iwae_paper.md", notebook="vae_mnist.ipynb"),
}


def get_system(name: str) -> System:
    if name not in SYSTEMS:
        raise GenlabError(f"unknown system {name!r}; choose one of {', '.join(SYSTEMS)}")
    return SYSTEMS[name]
