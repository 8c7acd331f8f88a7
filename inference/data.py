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

import gzip
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from models.common import GenlabError, check_binary  # noqa: F401  (re-exported)

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

    def batch(self, idx: torch.Tensor, generator: Optional[torch.Generator] = None) -> tuple:
        """The model's positional arguments for the datapoints ``idx``."""
        x = self.x[idx]
        if self.dynamic:
            x = torch.bernoulli(x, generator=generator)
        return (x,) if self.y is None else (x, self.y[idx])

    def head(self, n: int) -> "Split":
        """The first ``n`` datapoints."""
        return Split(self.x[:n], None if self.y is None else self.y[:n], self.dynamic)

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
        import torchvision

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
    import torchvision

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
    from urllib.error import URLError
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


HOLDOUTS = ("pca-top", "pca-bottom")


def first_principal_component(x: torch.Tensor):
    """(mean, unit direction) of the first principal component of the rows of ``x``.

    The sign is fixed so that the direction's largest-magnitude loading is positive.
    """
    mean = x.mean(0)
    xc = (x - mean).double()
    _, vecs = torch.linalg.eigh(xc.T @ xc)
    v = vecs[:, -1]
    v = v * torch.sign(v[v.abs().argmax()])
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


