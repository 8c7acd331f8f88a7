import gzip
import shutil

import pytest
import torch

from inference import data as D
from models.common import GenlabError


@pytest.fixture(scope="module")
def mnist_dynamic(data_dir, tmp_path_factory):
    import os

    os.environ["GENLAB_CACHE"] = str(tmp_path_factory.getbasetemp() / "genlab-cache")
    return D.load_images("mnist", "dynamic", data_dir, download=False)


def test_mnist_splits_and_labels(mnist_dynamic):
    d = mnist_dynamic
    assert (len(d.train), len(d.valid), len(d.test)) == (50000, 10000, 10000)
    assert d.train.x.shape[1] == 784 and d.train.y.dtype == torch.int64
    assert set(d.test.y.unique().tolist()) == set(range(10))
    # the validation split is the last 10,000 training images: its labels complete the train counts
    counts = torch.bincount(torch.cat([d.train.y, d.valid.y]), minlength=10)
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_dynamic_binarization_draws_fresh_pixels(mnist_dynamic):
    tr = mnist_dynamic.train
    assert tr.dynamic and not ((tr.x == 0) | (tr.x == 1)).all()  # grey levels are kept
    idx = torch.arange(2000)
    g = torch.Generator().manual_seed(1)
    a, b = tr.batch(idx, g)[0], tr.batch(idx, g)[0]
    D.check_binary(a)
    assert not torch.equal(a, b)
    # E[draw] = grey level: the mean pixel matches within 5 standard errors
    grey = tr.x[idx]
    se = (grey * (1 - grey)).sum().sqrt() / grey.numel()
    assert abs(a.mean() - grey.mean()) < 5 * se
    # seeded: the same generator state gives the same pixels
    assert torch.equal(tr.batch(idx, torch.Generator().manual_seed(1))[0], a)


def test_evaluation_splits_fixed_across_loads(data_dir, mnist_dynamic):
    again = D.load_images("mnist", "dynamic", data_dir, download=False)
    assert torch.equal(again.test.x, mnist_dynamic.test.x)
    assert torch.equal(again.valid.x, mnist_dynamic.valid.x)
    D.check_binary(again.test.x)


def test_fixed_binarization_is_one_seeded_draw(data_dir, mnist_dynamic):
    a = D.load_images("mnist", "fixed", data_dir, download=False)
    b = D.load_images("mnist", "fixed", data_dir, download=False)
    assert not a.train.dynamic and torch.equal(a.train.x, b.train.x)
    D.check_binary(a.train.x)
    grey = mnist_dynamic.train.x
    se = (grey * (1 - grey)).sum().sqrt() / grey.numel()
    assert abs(a.train.x.mean() - grey.mean()) < 5 * se
    # a batch of a fixed set never changes
    idx = torch.arange(10)
    assert torch.equal(a.train.batch(idx, torch.Generator())[0], a.train.x[:10])


def test_threshold_binarization(data_dir, mnist_dynamic):
    t = D.load_images("mnist", "threshold", data_dir, download=False)
    assert torch.equal(t.train.x, (mnist_dynamic.train.x > 0.5).float())


def test_larochelle_binarized_mnist(data_dir):
    d = D.load_images("binarized-mnist", None, data_dir, download=False)
    assert (len(d.train), len(d.valid), len(d.test)) == (50000, 10000, 10000)
    assert d.binarization == "larochelle" and d.train.y is None
    for split, mean in (("train", 0.13056), ("valid", 0.13113), ("test", 0.13251)):
        x = d.split(split).x
        D.check_binary(x)
        assert abs(x.mean().item() - mean) < 5e-6  # the data README's pixel means


def test_binarized_mnist_refuses_other_binarization(data_dir):
    with pytest.raises(GenlabError, match="binarized-mnist comes binarized"):
        D.load_images("binarized-mnist", "dynamic", data_dir, download=False)


def _copy_mnist(data_dir, dst):
    raw = dst / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in D.MNIST_FILES:
        shutil.copy(f"{data_dir}/MNIST/raw/{name}", raw / name)
    return raw


def test_truncated_mnist_file_names_path_and_md5(data_dir, tmp_path):
    raw = _copy_mnist(data_dir, tmp_path / "root")
    f = raw / "train-labels-idx1-ubyte.gz"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(GenlabError) as e:
        D.load_mnist(str(tmp_path / "root"), download=False)
    msg = str(e.value)
    assert str(f) in msg and D.MNIST_FILES[f.name] in msg and "corrupt or truncated" in msg
    assert "\n" not in msg


def test_missing_mnist_directory(tmp_path):
    with pytest.raises(GenlabError) as e:
        D.load_mnist(str(tmp_path / "nothing"), download=False)
    msg = str(e.value)
    assert "is missing" in msg and str(tmp_path / "nothing" / "MNIST" / "raw") in msg
    assert "f68b3c2dcbeaaa9fbdd348bbdeb94873" in msg


def test_shared_data_is_never_written(data_dir, tmp_path):
    from pathlib import Path

    before = sorted(p.name for p in Path(data_dir).rglob("*"))
    D.load_mnist(data_dir, "fixed", download=False)
    assert sorted(p.name for p in Path(data_dir).rglob("*")) == before


def test_corrupt_amat(tmp_path):
    folder = tmp_path / "binarized_mnist"
    folder.mkdir()
    with gzip.open(folder / "binarized_mnist_train.amat.gz", "wb") as f:
        f.write(b"0 1 0\n1 1 0\n")
    with pytest.raises(GenlabError, match="corrupt or altered .*expected db28b1a6ae0fe70cbd3da91acf46e477"):
        D.load_binarized_mnist(str(tmp_path), download=False)
    (folder / "binarized_mnist_train.amat.gz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(GenlabError, match="corrupt or truncated"):
        D.load_binarized_mnist(str(tmp_path), download=False)


def test_amat_parser_refuses_bad_rows(tmp_path):
    with pytest.raises(GenlabError, match="not 2 rows of 784"):
        D._parse_amat(b"0 1\n1 0\n", tmp_path / "x.amat", 2)
    ok = D._parse_amat((" ".join(["1"] * 784) + "\n").encode() * 2, tmp_path / "x.amat", 2)
    assert ok.shape == (2, 784) and ok.sum() == 2 * 784


def test_check_binary_message():
    with pytest.raises(GenlabError, match=r"images must be 0/1 for a Bernoulli likelihood; found the value 0.5"):
        D.check_binary(torch.tensor([0.0, 1.0, 0.5]))


def test_unknown_dataset_and_binarization(data_dir):
    with pytest.raises(GenlabError, match="unknown dataset 'cifar'"):
        D.load_images("cifar", None, data_dir)
    with pytest.raises(GenlabError, match="MNIST binarization must be dynamic, fixed or threshold"):
        D.load_images("mnist", "larochelle", data_dir)


def test_spread_subset_covers_a_sorted_test_file(data_dir):
    d = D.load_images("binarized-mnist", None, data_dir, download=False)
    first, spread = d.test.subset(100), d.test.subset(100, spread=True)
    assert torch.equal(spread.x[0], d.test.x[0]) and torch.equal(spread.x[1], d.test.x[100])
    assert len(first) == len(spread) == 100 and not torch.equal(first.x, spread.x)
    # the test file is sorted by class: the first 100 are all zeros, heavier than the average
    assert first.x.mean() > spread.x.mean()
