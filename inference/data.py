"""The one data module: MNIST and Larochelle binarized MNIST as tensors, with named binarization.

Where data comes from: ``--data-dir``, else ``$GENLAB_DATA``, else the user cache
(``$GENLAB_CACHE``, default ``~/.cache/genlab``).  The data root is never written to:
torchvision extracts archives next to themselves, so the four MNIST ``.gz`` files are
md5-checked and copied into the cache first, and torchvision works on the copy.

Binarization (MNIST grey levels -> {0, 1}) is explicit and named:

* ``dynamic``   -- a fresh Bernoulli(grey level) draw for every training batch (Burda et al. 2015);
* ``fixed``     -- one Bernoulli draw per split with a fixed seed;
* ``threshold`` -- grey level > 0.5;
* ``larochelle``-- the fixed binarization of Larochelle & Murray (2011), read from the
  ``binarized_mnist_{train,valid,test}.amat[.gz]`` files (the literature's benchmark set).

Evaluation splits (valid, test) are always binarized once with a fixed seed, so two evaluations
of one model see the same pixels.  Splits: MNIST validation is the last 10,000 training
images; binarized MNIST has its own 50,000 / 10,000 / 10,000 split and no labels.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from models.common import GenlabError, check_binary, option  # noqa: F401  (check_binary re-exported)
from models.dirichlet import check_alpha

BINARIZATIONS = ("dynamic", "fixed", "threshold", "larochelle")
DATASETS = ("mnist", "binarized-mnist")

MNIST_FILES = {  # md5 of the .gz, as torchvision checks them
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
AMAT_FILES = {  # md5 of the uncompressed .amat
    "train": ("binarized_mnist_train.amat", "db28b1a6ae0fe70cbd3da91acf46e477", 50000),
    "valid": ("binarized_mnist_valid.amat", "bf37822a04e94123630de6a7dfd9c9ef", 10000),
    "test": ("binarized_mnist_test.amat", "14e41ae11040adba6ab8cb291eda0dd8", 10000),
}
AMAT_URL = "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
MNIST_VALID = 10000
#: Seeds of the one-off Bernoulli draws (``fixed`` training set, every evaluation split).
BINARIZE_SEEDS = {"train": 20111, "valid": 20112, "test": 20113}
HOLDOUTS = ("pca-top", "pca-bottom")


# ----------------------------------------------------------------------------- data configs
# One dataclass per kind of data: the one source of its defaults, from which the training
# command line's data flags and their help are generated (inference.systems).
@dataclass
class ImageData:
    """Images: MNIST (grey levels, binarized as ``binarization`` says) or Larochelle's set."""

    dataset: str = option("mnist", "mnist (grey levels, binarized as --binarization says) or "
                          "binarized-mnist (Larochelle's fixed set)", choices=DATASETS)
    binarization: Optional[str] = option(None, "dynamic (the default for mnist), fixed, "
                                         "threshold; larochelle for binarized-mnist",
                                         choices=BINARIZATIONS)
    holdout: Optional[str] = option(None, "train without the top / bottom fraction of training "
                                    "images along the first principal component; they become "
                                    "the evaluation split 'holdout'", choices=HOLDOUTS)
    holdout_fraction: float = option(0.05, "share held out by --holdout")


@dataclass
class RegressionData:
    """1-D regression data: the seeded "wiggles" generator, or a CSV of two columns."""

    csv: Optional[str] = option(None, "a CSV of two numeric columns x, y (instead of the "
                                "wiggles generator)")
    n_train: int = option(500, "wiggles training points")
    n_valid: int = option(500, "wiggles validation points")
    n_test: int = option(1000, "wiggles test points")
    data_seed: int = option(0, "seed of the wiggles draw or the CSV split")


@dataclass
class DirichletData:
    """Symbols for the conjugate model: S sequences, each with its own p ~ Dirichlet(alpha)."""

    alpha: list[float] = option([1.3, 1.3, 1.3], "prior concentration, also the law of the "
                                "true p's")
    symbols: int = option(100, "training symbols per sequence")
    sequences: int = option(1, "independent sequences S, each with its own p")
    p: Optional[list[float]] = option(None, "a fixed true p for every sequence instead of draws "
                                      "from Dirichlet(alpha)")
    test_symbols: Optional[int] = option(None, "valid and test symbols per sequence (default: "
                                         "--symbols)")
    data_seed: int = option(0, "seed of the data draws")


@dataclass
class SequenceData:
    """The meta-learning task: symbol sequences whose law is redrawn every ``period`` steps."""

    alpha: list[float] = option([1.3, 1.3, 1.3], "Dirichlet law of each block's p")
    period: int = option(5, "reset period T")
    p: Optional[list[float]] = option(None, "train on a fixed p instead (fixed-p mode)")
    length: int = option(100, "sequence length L")
    sequences: int = option(6400, "training sequences (6400 = 50 batches of 128)")
    valid_sequences: int = option(1000, "validation sequences")
    test_sequences: int = option(1000, "test sequences")
    data_seed: int = option(0, "seed of the data draws")


def cache_dir() -> Path:
    """The user cache: ``$GENLAB_CACHE`` or ``~/.cache/genlab``."""
    env = os.environ.get("GENLAB_CACHE")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "genlab"
    return base


def data_root(data_dir: Optional[str] = None) -> Path:
    """``--data-dir``, else ``$GENLAB_DATA``, else ``<cache>/data``."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("GENLAB_DATA")
    return Path(env).expanduser() if env else cache_dir() / "data"


def spread_indices(total: int, n: int) -> torch.Tensor:
    """The one "spread" subset: ``n`` indices evenly through ``0..total-1``, i * total // n
    (all of them when n >= total).  For sorted files, such as Larochelle's binarized-MNIST test
    set (ordered by class), where "the first n" would be one class."""
    n = min(int(n), int(total))
    return torch.arange(n) * int(total) // n


@dataclass
class Split:
    """One split as tensors.  ``x`` is ``(N, 784)`` float32; ``y`` is ``(N,)`` int64 or None.

    With ``dynamic=True``, ``x`` holds grey levels and every :meth:`batch` draws fresh
    Bernoulli pixels from them; otherwise ``x`` is already 0/1.
    """

    x: torch.Tensor
    y: Optional[torch.Tensor] = None
    dynamic: bool = False

    def __len__(self) -> int:
        return self.x.shape[0]

    def tensors(self) -> tuple:
        """The model's positional arguments for the whole split: ``(x,)`` or ``(x, y)``."""
        return (self.x,) if self.y is None else (self.x, self.y)

    def batch(self, idx: Optional[torch.Tensor] = None,
              generator: Optional[torch.Generator] = None, fields: Optional[tuple] = None) -> tuple:
        """The fields ``fields`` (default: ``x``, and ``y`` when present) of the datapoints
        ``idx`` (default: all), in that order; dynamic binarization draws ``x`` afresh."""
        fields = self.fields() if fields is None else tuple(fields)
        out = []
        for name in fields:
            value = getattr(self, name, None)
            if value is None:
                raise GenlabError(f"this data has no field {name!r} (it has {', '.join(self.fields())})")
            value = value if idx is None else value[idx]
            if name == "x" and self.dynamic and idx is not None:
                value = torch.bernoulli(value, generator=generator)
            out.append(value)
        return tuple(out)

    def fields(self) -> tuple:
        return ("x",) if self.y is None else ("x", "y")

    def head(self, n: int) -> "Split":
        """The first ``n`` datapoints."""
        return Split(self.x[:n], None if self.y is None else self.y[:n], self.dynamic)

    def spread(self, n: int) -> "Split":
        """``n`` datapoints spread evenly through the split (datapoint i * len // n), for files
        that are sorted, like Larochelle's binarized-MNIST test set (ordered by class)."""
        idx = spread_indices(len(self), n)
        return Split(self.x[idx], None if self.y is None else self.y[idx], self.dynamic)

    def subset(self, limit: Optional[int], spread: bool = False) -> "Split":
        """The datapoints an evaluation with ``--limit`` (and ``--spread``) uses."""
        if limit is None:
            return self
        return self.spread(limit) if spread else self.head(limit)

    def to(self, device) -> "Split":
        return Split(self.x.to(device), None if self.y is None else self.y.to(device), self.dynamic)


@dataclass
class Dataset:
    name: str
    binarization: str
    train: Split
    valid: Split
    test: Split
    source: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)  # further named evaluation splits (e.g. holdout)

    def split(self, name: str) -> Split:
        if name in ("train", "valid", "test"):
            return getattr(self, name)
        if name in self.extra:
            return self.extra[name]
        names = ", ".join(["train", "valid", "test", *self.extra])
        raise GenlabError(f"unknown split {name!r}; this data set has {names}")

    def to(self, device) -> "Dataset":
        return Dataset(self.name, self.binarization, self.train.to(device), self.valid.to(device),
                       self.test.to(device), self.source,
                       {k: v.to(device) for k, v in self.extra.items()})


# ----------------------------------------------------------------------------- file checks
def md5_of(path: Path, gunzip: bool = False) -> str:
    h = hashlib.md5()
    opener = gzip.open if gunzip else open
    try:
        with opener(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return h.hexdigest()


def _atomic_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def binarize(grey: torch.Tensor, mode: str, seed: int) -> torch.Tensor:
    """0/1 float pixels from grey levels in [0, 1] by ``fixed`` (seeded draw) or ``threshold``."""
    if mode == "threshold":
        return (grey > 0.5).float()
    if mode in ("fixed", "dynamic"):
        g = torch.Generator().manual_seed(seed)
        return torch.bernoulli(grey, generator=g)
    raise GenlabError(f"unknown binarization {mode!r}; choose one of {', '.join(BINARIZATIONS)}")


# ----------------------------------------------------------------------------- MNIST
def _mnist_torchvision_root(root: Path, download: bool) -> Path:
    """A writable torchvision root holding the four md5-checked MNIST archives."""
    # one working copy per data root, so a root's own missing or corrupt file is always reported
    key = hashlib.md5(str(root.resolve()).encode()).hexdigest()[:12]
    work = cache_dir() / "torchvision" / key
    raw = work / "MNIST" / "raw"
    missing = []
    for name, md5 in MNIST_FILES.items():
        dst = raw / name
        if dst.exists() and md5_of(dst) == md5:
            continue
        src = next((p for p in (root / "MNIST" / "raw" / name, root / name) if p.exists()), None)
        if src is None:
            missing.append(name)
            continue
        got = md5_of(src)
        if got != md5:
            raise GenlabError(
                f"MNIST file {src} is corrupt or truncated (md5 {got}, expected {md5}); "
                "replace it with the original from the MNIST site or torchvision's download"
            )
        _atomic_copy(src, dst)
    if missing:
        where = root / "MNIST" / "raw"
        if not download:
            raise GenlabError(
                f"MNIST file {where / missing[0]} is missing (expected md5 "
                f"{MNIST_FILES[missing[0]]}); put the four MNIST .gz files in {where} "
                "or run online once so torchvision.datasets.MNIST can download them"
            )
        import torchvision  # heavy (~1 s): only when MNIST is first read

        try:
            torchvision.datasets.MNIST(str(work), train=True, download=True)
        except Exception as e:  # network errors come in many types
            raise GenlabError(
                f"MNIST is not in {where} and downloading it failed ({type(e).__name__}); "
                f"put the four MNIST .gz files (e.g. {missing[0]}, md5 {MNIST_FILES[missing[0]]}) "
                f"in {where}"
            ) from None
    return work


def _load_mnist_arrays(root: Path, download: bool):
    """(train_images uint8 (60000, 784), train_labels, test_images, test_labels)."""
    work = _mnist_torchvision_root(root, download)
    import torchvision  # heavy (~1 s): only when MNIST is first read

    out = []
    for train in (True, False):
        try:
            ds = torchvision.datasets.MNIST(str(work), train=train, download=True)
        except Exception as e:
            raise GenlabError(f"could not read MNIST from {work} ({type(e).__name__}: {e})") from None
        out += [ds.data.reshape(-1, 784), ds.targets.long()]
    return out


def load_mnist(
    data_dir: Optional[str] = None,
    binarization: str = "dynamic",
    download: bool = True,
) -> Dataset:
    """MNIST with labels, split 50,000 / 10,000 / 10,000, binarized as named."""
    if binarization not in ("dynamic", "fixed", "threshold"):
        raise GenlabError(
            f"MNIST binarization must be dynamic, fixed or threshold, got {binarization!r} "
            "(larochelle is the binarized-mnist dataset)"
        )
    root = data_root(data_dir)
    xtr, ytr, xte, yte = _load_mnist_arrays(root, download)
    grey_tr = xtr[:-MNIST_VALID].float() / 255.0
    grey_va = xtr[-MNIST_VALID:].float() / 255.0
    grey_te = xte.float() / 255.0
    if binarization == "dynamic":
        train = Split(grey_tr, ytr[:-MNIST_VALID], dynamic=True)
    else:
        train = Split(binarize(grey_tr, binarization, BINARIZE_SEEDS["train"]), ytr[:-MNIST_VALID])
    eval_mode = "threshold" if binarization == "threshold" else "fixed"
    valid = Split(binarize(grey_va, eval_mode, BINARIZE_SEEDS["valid"]), ytr[-MNIST_VALID:])
    test = Split(binarize(grey_te, eval_mode, BINARIZE_SEEDS["test"]), yte)
    return Dataset("mnist", binarization, train, valid, test, {"root": str(root)})


# ----------------------------------------------------------------------------- binarized MNIST
def _find_amat(root: Path, name: str) -> Optional[Path]:
    for folder in (root / "binarized_mnist", root):
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.exists():
                return candidate
    return None


def _parse_amat(raw: bytes, path: Path, rows: int) -> np.ndarray:
    """Rows of 784 space-separated 0/1 values -> uint8 ``(rows, 784)``; refuses anything else."""
    a = np.frombuffer(raw, dtype=np.uint8)
    bits = (a == ord("0")) | (a == ord("1"))
    other = ~(bits | (a == ord(" ")) | (a == ord("\n")) | (a == ord("\r")))
    values = a[bits] - ord("0")
    if other.any() or values.size != rows * 784:
        raise GenlabError(
            f"binarized MNIST file {path} is not {rows} rows of 784 values 0/1 "
            f"(found {values.size} 0/1 values); replace it with the original from {AMAT_URL}"
        )
    return values.reshape(rows, 784)


def _load_amat(root: Path, split: str, download: bool) -> np.ndarray:
    name, md5, rows = AMAT_FILES[split]
    path = _find_amat(root, name)
    if path is None:
        where = root / "binarized_mnist" / name
        if download:
            path = _download_amat(name)
        if path is None:
            raise GenlabError(
                f"binarized MNIST file {where}[.gz] is missing (expected md5 of the .amat {md5}); "
                f"get {name} from {AMAT_URL} and put it (plain or gzipped) in {where.parent}"
            )
    st = path.stat()
    key = hashlib.md5(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = cache_dir() / "arrays" / f"{name}-{key}.npy"
    if cached.exists():
        return np.load(cached)
    gz = path.suffix == ".gz"
    try:
        raw = gzip.open(path, "rb").read() if gz else path.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise GenlabError(
            f"binarized MNIST file {path} is corrupt or truncated ({type(e).__name__}); "
            f"replace it with the original from {AMAT_URL} (md5 of the .amat {md5})"
        ) from None
    got = hashlib.md5(raw).hexdigest()
    if got != md5:
        raise GenlabError(
            f"binarized MNIST file {path} is corrupt or altered (md5 of the .amat {got}, expected "
            f"{md5}); replace it with the original from {AMAT_URL}"
        )
    arr = _parse_amat(raw, path, rows)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(cached.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, cached)
    return arr


def _download_amat(name: str) -> Optional[Path]:
    """Fetch one ``.amat`` into the cache; None when offline."""
    from urllib.error import URLError  # only when downloading
    from urllib.request import urlretrieve

    dst = cache_dir() / "data" / "binarized_mnist" / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    try:
        urlretrieve(AMAT_URL + name, tmp)
    except (URLError, OSError):
        tmp.unlink(missing_ok=True)
        return None
    os.replace(tmp, dst)
    return dst


def load_binarized_mnist(data_dir: Optional[str] = None, download: bool = True) -> Dataset:
    """Larochelle & Murray's fixed binarization: 50,000 / 10,000 / 10,000, no labels."""
    root = data_root(data_dir)
    splits = {s: Split(torch.from_numpy(_load_amat(root, s, download)).float()) for s in AMAT_FILES}
    return Dataset("binarized-mnist", "larochelle", splits["train"], splits["valid"],
                   splits["test"], {"root": str(root)})


def load_images(
    dataset: str = "mnist",
    binarization: Optional[str] = None,
    data_dir: Optional[str] = None,
    download: bool = True,
    holdout: Optional[str] = None,
    holdout_fraction: float = 0.05,
) -> Dataset:
    """MNIST (``dataset="mnist"``) or Larochelle's binarized MNIST (``"binarized-mnist"``).

    ``holdout="pca-top"`` / ``"pca-bottom"`` removes the training images in the top / bottom
    ``holdout_fraction`` along the first principal component and offers them as the extra
    split ``"holdout"`` (see :func:`pca_holdout`).
    """
    if dataset == "mnist":
        data = load_mnist(data_dir, binarization or "dynamic", download)
    elif dataset == "binarized-mnist":
        if binarization not in (None, "larochelle"):
            raise GenlabError(
                f"binarized-mnist comes binarized (larochelle); binarization {binarization!r} "
                "applies to the mnist dataset"
            )
        data = load_binarized_mnist(data_dir, download)
    else:
        raise GenlabError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if holdout is not None:
        data = pca_holdout(data, holdout, holdout_fraction)
    return data



def first_principal_component(x: torch.Tensor):
    """(mean, unit direction) of the first principal component of the rows of ``x``.

    The sign is fixed so that the direction's largest-magnitude loading is positive.
    """
    mean = x.mean(0)
    xc = x - mean
    cov = (xc.T @ xc).double() / x.shape[0]  # float32 products, float64 iteration
    # power iteration from a fixed start: deterministic, and fast where a full eigensolver
    # is slow on a busy machine; stops when the direction moves less than 1e-12
    v = torch.ones(cov.shape[0], dtype=torch.float64) / cov.shape[0] ** 0.5
    for _ in range(5000):
        w = cov @ v
        w = w / w.norm()
        if (w - v).norm() < 1e-12:
            break
        v = w
    v = w * torch.sign(w[w.abs().argmax()])
    return mean, v.float()


def pca_holdout(data: Dataset, which: str, fraction: float = 0.05) -> Dataset:
    """An "extreme" holdout: one-dimensional PCA of the training images (grey levels or bits),
    then the top or bottom ``fraction`` of them along it leave ``train`` for the ``holdout``
    split (binarized once with a fixed seed, like every evaluation split)."""
    if which not in HOLDOUTS:
        raise GenlabError(f"unknown holdout {which!r}; choose one of {', '.join(HOLDOUTS)}")
    if not 0 < fraction < 0.5:
        raise GenlabError(f"the holdout fraction must lie in (0, 0.5), got {fraction}")
    tr = data.train
    mean, v = first_principal_component(tr.x)
    score = (tr.x - mean) @ v
    n_out = int(round(fraction * len(tr)))
    order = torch.argsort(score, descending=(which == "pca-top"))
    out, keep = order[:n_out], torch.sort(order[n_out:]).values
    x_out = tr.x[out]
    if tr.dynamic:
        x_out = binarize(x_out, "fixed", BINARIZE_SEEDS["test"] + 1)
    y = tr.y
    hold = Split(x_out, None if y is None else y[out])
    train = Split(tr.x[keep], None if y is None else y[keep], tr.dynamic)
    source = dict(data.source, holdout=which, holdout_fraction=fraction,
                  holdout_threshold=float(score[out[-1]]))
    return Dataset(data.name, data.binarization, train, data.valid, data.test, source,
                   dict(data.extra, holdout=hold))




# ----------------------------------------------------------------------------- 1-D regression
#: The x range of the "wiggles" set, and the seed offset of its splits.
WIGGLES_RANGE = (-4.0, 4.0)
_WIGGLES_SEED = 4004


def wiggles_mean(x: torch.Tensor) -> torch.Tensor:
    """The true mean of the "wiggles" set: m(x) = sin(2.5 x) + 0.2 x."""
    return torch.sin(2.5 * x) + 0.2 * x


def wiggles_noise_scale(x: torch.Tensor) -> torch.Tensor:
    """The true noise scale: s(x) = 0.01 + 0.4 sigmoid(2 (x + 1)); about 0.01 for x < -2.5
    (the near-noise-free region where a heteroscedastic fit drives σ(x) toward 0) rising to
    0.41 at the right edge."""
    return 0.01 + 0.4 * torch.sigmoid(2.0 * (x + 1.0))


def make_wiggles(n_train: int = 500, n_valid: int = 500, n_test: int = 1000,
                 seed: int = 0) -> Dataset:
    """The seeded synthetic regression set: x ~ Uniform(-4, 4), y = m(x) + s(x) ε, ε ~ N(0, 1).

    Splits are ``Split(x=(N, 1), y=(N,))``, each drawn from its own generator (seed
    ``4004 + 3 seed + k``, k = 0, 1, 2 for train, valid, test), so changing one split's size
    leaves the others as they were.
    """
    sizes = {"train": n_train, "valid": n_valid, "test": n_test}
    for name, n in sizes.items():
        if not isinstance(n, int) or n < 1:
            raise GenlabError(f"the wiggles {name} split needs a positive number of points, got {n}")
    lo, hi = WIGGLES_RANGE
    splits = {}
    for k, (name, n) in enumerate(sizes.items()):
        g = torch.Generator().manual_seed(_WIGGLES_SEED + 3 * int(seed) + k)
        x = lo + (hi - lo) * torch.rand(n, 1, generator=g)
        y = wiggles_mean(x[:, 0]) + wiggles_noise_scale(x[:, 0]) * torch.randn(n, generator=g)
        splits[name] = Split(x, y)
    return Dataset("wiggles", "none", splits["train"], splits["valid"], splits["test"],
                   dict(generator="wiggles", seed=int(seed), **{f"n_{k}": v for k, v in sizes.items()}))


def regression_dataset(x, y, name: str = "xy", seed: int = 0, valid_fraction: float = 0.2,
                       test_fraction: float = 0.2, source: Optional[dict] = None) -> Dataset:
    """A 1-D regression Dataset from values ``x``, ``y`` (same length), shuffled with ``seed``
    and split into train / valid / test by the fractions."""
    x = torch.as_tensor(x, dtype=torch.float32).reshape(-1)
    y = torch.as_tensor(y, dtype=torch.float32).reshape(-1)
    if x.shape[0] != y.shape[0]:
        raise GenlabError(f"x and y must have the same length, got {x.shape[0]} x values and "
                          f"{y.shape[0]} y values")
    if not (bool(torch.isfinite(x).all()) and bool(torch.isfinite(y).all())):
        raise GenlabError("x and y must be finite numbers (found NaN or infinity)")
    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise GenlabError("the valid and test fractions must be positive and sum to less than 1")
    n = x.shape[0]
    n_valid, n_test = int(round(valid_fraction * n)), int(round(test_fraction * n))
    if min(n_valid, n_test, n - n_valid - n_test) < 1:
        raise GenlabError(f"{n} points are too few to split into train, valid and test")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    parts = [perm[: n - n_valid - n_test], perm[n - n_valid - n_test : n - n_test], perm[n - n_test :]]
    tr, va, te = (Split(x[p].unsqueeze(1), y[p]) for p in parts)
    return Dataset(name, "none", tr, va, te, dict(source or {}, seed=int(seed)))


def load_xy_csv(path, seed: int = 0, valid_fraction: float = 0.2,
                test_fraction: float = 0.2) -> Dataset:
    """A user's CSV of two numeric columns x, y (an optional header row names them; other
    columns are refused), split as :func:`regression_dataset` does."""
    path = Path(path).expanduser()
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except OSError as e:
        raise GenlabError(f"cannot read the CSV {path} ({type(e).__name__}: {e.strerror or e})") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise GenlabError(f"{path} is not a readable CSV ({type(e).__name__})") from None

    def number(text):
        try:
            return float(text)
        except ValueError:
            return None

    start, names = 0, ["x", "y"]
    if rows and all(number(c) is None for c in rows[0] if c.strip()):
        start, names = 1, [c.strip() for c in rows[0]]
    if len(names) != 2 or any(len(r) > 2 for r in rows[start:]):
        raise GenlabError(f"{path} must have exactly two columns (x, y)")
    cols = ([], [])
    for line, row in enumerate(rows[start:], start=start + 1):
        row = list(row) + [""] * (2 - len(row))
        for j, text in enumerate(row):
            if not text.strip():
                cols[j].append(None)
                continue
            v = number(text)
            if v is None or not np.isfinite(v):
                raise GenlabError(f"{path} line {line}: non-numeric value {text.strip()!r} in "
                                  f"column {names[j]}")
            cols[j].append(v)
    counts = []
    for j in range(2):  # trailing blanks: a column shorter than the other
        while cols[j] and cols[j][-1] is None:
            cols[j].pop()
        counts.append(len(cols[j]))
    if counts[0] != counts[1]:
        raise GenlabError(f"{path}: x and y have different lengths ({counts[0]} x values, "
                          f"{counts[1]} y values)")
    for j in range(2):
        if None in cols[j]:
            line = start + 1 + cols[j].index(None)
            raise GenlabError(f"{path} line {line}: missing value in column {names[j]}")
    if counts[0] == 0:
        raise GenlabError(f"{path} holds no data rows")
    return regression_dataset(cols[0], cols[1], name=f"csv:{path.name}", seed=seed,
                              valid_fraction=valid_fraction, test_fraction=test_fraction,
                              source=dict(csv=str(path.resolve())))


# ----------------------------------------------------------------------------- symbol sequences
def _symbol_law(alpha, p, num_symbols: Optional[int] = None):
    """(alpha (J,) float64 numpy or None, p (J,) float64 numpy or None), checked."""
    a = None if alpha is None else check_alpha(alpha, num_symbols).double().numpy()
    q = None
    if p is not None:
        q = np.asarray(torch.as_tensor(p, dtype=torch.float64), dtype=np.float64).reshape(-1)
        if (a is not None and q.shape != a.shape) or q.size < 1:
            raise GenlabError(f"the fixed p needs one probability per symbol, got {q.tolist()}")
        if (q < 0).any() or abs(q.sum() - 1.0) > 1e-6:
            raise GenlabError(f"the fixed p must be non-negative and sum to 1, got {q.tolist()}")
    if a is None and q is None:
        raise GenlabError("give alpha (p is drawn from Dirichlet(alpha)) or a fixed p")
    return a, q


def _categorical_draws(rng: np.random.Generator, probs: np.ndarray, shape) -> np.ndarray:
    """Symbols ``shape`` from rows ``probs`` (..., J) broadcast to ``shape``, by inverse CDF."""
    cdf = np.cumsum(np.broadcast_to(probs, tuple(shape) + probs.shape[-1:]), axis=-1)
    u = rng.random(tuple(shape) + (1,)) * cdf[..., -1:]
    return np.minimum((u >= cdf).sum(-1), probs.shape[-1] - 1)


def symbol_sequences(n: int, length: int, period: int, alpha=None, p=None, seed: int = 0):
    """``n`` sequences of ``length`` symbols over ``0..J-1`` plus the reset symbol ``J``.

    Position ``t`` holds the reset symbol when ``t % period == 0`` (so every sequence starts
    with one); the ``period - 1`` symbols after a reset are i.i.d. Categorical(p) with a fresh
    ``p ~ Dirichlet(alpha)`` per block, or the fixed ``p`` for every block (fixed-p mode).
    Returns ``(x, probs)``: ``x`` int64 ``(n, length)``, ``probs`` float64 ``(n, blocks, J)``
    the p of every block.  Seeded numpy draws: the same arguments give the same sequences.
    """
    if int(period) != period or period < 1:
        raise GenlabError(f"the reset period T must be an integer of at least 1, got {period}")
    if int(length) != length or length < 2:
        raise GenlabError(f"sequences need a length of at least 2 symbols, got {length}")
    if int(n) != n or n < 1:
        raise GenlabError(f"the number of sequences must be a positive integer, got {n}")
    a, q = _symbol_law(alpha, p)
    J = (a if a is not None else q).size
    rng = np.random.default_rng(seed)
    blocks = -(-int(length) // int(period))
    probs = np.broadcast_to(q, (n, blocks, J)).copy() if q is not None else rng.dirichlet(a, (n, blocks))
    t = np.arange(length)
    draws = _categorical_draws(rng, probs[:, t // period, :], (n, length))
    x = np.where(t % period == 0, J, draws)
    return torch.from_numpy(x.astype(np.int64)), torch.from_numpy(probs)


def load_sequences(alpha=(1.3, 1.3, 1.3), period: int = 5, p=None, length: int = 100,
                   train: int = 6400, valid: int = 1000, test: int = 1000, seed: int = 0) -> Dataset:
    """The meta-learning task: reset-every-T symbol sequences, as ``Split(x (N, length))``.

    Train, valid and test are independent draws (seeds ``seed``, ``seed + 1``, ``seed + 2``)
    from one law: p ~ Dirichlet(alpha) per block, or the fixed ``p`` when given.
    """
    a, q = _symbol_law(alpha if p is None else None, p)
    splits = {}
    for i, (name, size) in enumerate((("train", train), ("valid", valid), ("test", test))):
        x, _ = symbol_sequences(size, length, period, alpha=a, p=q, seed=seed + i)
        splits[name] = Split(x)
    law = dict(alpha=None if a is None else a.tolist(), p=None if q is None else q.tolist())
    return Dataset("symbol-sequences", "none", splits["train"], splits["valid"], splits["test"],
                   dict(period=int(period), length=int(length), seed=int(seed), **law))


def load_dirichlet(alpha=(1.3, 1.3, 1.3), symbols: int = 100, sequences: int = 1, p=None,
                   test_symbols: Optional[int] = None, seed: int = 0) -> Dataset:
    """Symbol draws for the conjugate model: ``sequences`` independent sequences, each with its
    own ``p ~ Dirichlet(alpha)`` (or the fixed ``p``), ``symbols`` training draws each.

    Each split is ``Split(x, y=seq)``: ``x`` int64 ``(S * n,)`` symbols, sequence-major, and
    ``seq`` int64 ``(S * n,)`` which sequence each symbol belongs to.  Valid and test hold
    ``test_symbols`` (default ``symbols``) further draws from the same p's.  The true p's
    ``(S, J)`` are in ``source["p_true"]``.
    """
    a, q = _symbol_law(alpha, p)
    for name, v in (("symbols", symbols), ("sequences", sequences)):
        if int(v) != v or v < 1:
            raise GenlabError(f"the number of {name} must be a positive integer, got {v}")
    test_symbols = symbols if test_symbols is None else test_symbols
    if int(test_symbols) != test_symbols or test_symbols < 1:
        raise GenlabError(f"the number of test symbols must be a positive integer, got {test_symbols}")
    rng = np.random.default_rng(seed)
    S, J = int(sequences), a.size
    p_true = np.broadcast_to(q, (S, J)).copy() if q is not None else rng.dirichlet(a, S)
    splits = {}
    for name, n in (("train", symbols), ("valid", test_symbols), ("test", test_symbols)):
        x = _categorical_draws(rng, p_true[:, None, :], (S, int(n)))
        seq = np.repeat(np.arange(S), int(n))
        splits[name] = Split(torch.from_numpy(x.reshape(-1).astype(np.int64)), torch.from_numpy(seq))
    return Dataset("dirichlet-symbols", "none", splits["train"], splits["valid"], splits["test"],
                   dict(alpha=a.tolist(), p_true=p_true.tolist(), seed=int(seed)))
