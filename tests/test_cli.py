import json
import subprocess
import sys

import pytest

from evaluation.cli import main as eval_main
from inference.cli import main as train_main

TINY = ["--latent-dim", "2", "--hidden", "16", "--limit", "128", "--batch-size", "64", "--quiet"]


def one_line_error(capsys, code, expect_code=2):
    err = capsys.readouterr().err
    assert code == expect_code
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def run_train(capsys, *argv):
    with pytest.raises(SystemExit) as e:
        train_main(list(argv))
    return one_line_error(capsys, e.value.code)


def test_unknown_system(capsys):
    line = run_train(capsys, "gan")
    assert line.startswith("genlab-train: error: argument SYSTEM: invalid choice: 'gan'")


@pytest.mark.parametrize("flag,value,msg", [
    ("--batch-size", "-3", "--batch-size must be a positive integer, got -3"),
    ("--epochs", "-1", "--epochs must be a non-negative integer, got -1"),
    ("--lr", "0", "--lr must be a positive number, got 0.0"),
    ("--limit", "0", "--limit must be a positive integer, got 0"),
])
def test_bad_sizes(capsys, tmp_path, flag, value, msg):
    code = train_main(["vae", flag, value, "--out", str(tmp_path / "r"), "--quiet"])
    assert one_line_error(capsys, code) == f"genlab-train: error: {msg}"


def test_resume_of_another_system(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"system": "cvae"}))
    code = train_main(["vae", "--resume", "--out", str(tmp_path)])
    assert one_line_error(capsys, code) == (
        f"genlab-train: error: {tmp_path} holds a 'cvae' run, not 'vae'")


def test_resume_refuses_changed_options(capsys, tmp_path, data_dir):
    out = str(tmp_path / "r")
    assert train_main(["vae", *TINY, "--epochs", "1", "--out", out, "--data-dir", data_dir]) == 0
    code = train_main(["vae", "--resume", "--out", out, "--batch-size", "7"])
    assert ("only --epochs, --patience, --device, --data-dir, --lr, --checkpoint-every, "
            "--dist-timeout and --divergence-factor may change" in one_line_error(capsys, code))


def test_train_then_evaluate_json(capsys, tmp_path, data_dir):
    out = str(tmp_path / "r")
    assert train_main(["vae", *TINY, "--epochs", "1", "--out", out, "--data-dir", data_dir]) == 0
    capsys.readouterr()
    assert eval_main([out, "--k", "1,4,16", "--limit", "12", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res) >= {"elbo", "iwae", "khat_gt_0.7", "n"} and res["n"] == 12
    assert set(res["iwae"]) == {"1", "4", "16"}
    assert res["iwae"]["1"] == pytest.approx(res["elbo"])  # k = 1 groups: the mean log weight
    assert (tmp_path / "r" / "eval_test.npz").exists()
    # the table form names the run and the estimator settings
    assert eval_main([out, "--k", "1,4", "--limit", "4"]) == 0
    table = capsys.readouterr().out
    assert "vae (" in table and "K = 4" in table and "IWAE k=4" in table


def test_eval_errors(capsys, tmp_path):
    code = eval_main([str(tmp_path)])
    assert one_line_error(capsys, code) == f"genlab-eval: error: {tmp_path} is not a run directory (no config.json)"
    with pytest.raises(SystemExit) as e:
        eval_main([str(tmp_path), "--k", "0,5"])
    assert "every k must be at least 1" in one_line_error(capsys, e.value.code)


def test_console_entry_exit_code_and_help():
    r = subprocess.run([sys.executable, "-m", "inference", "vae", "--batch-size", "0", "--quiet"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "inference", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "vae" in r.stdout and "Bernoulli-pixel VAE" in r.stdout


def test_evaluate_a_kept_epoch(capsys, tmp_path, data_dir):
    out = str(tmp_path / "r")
    assert train_main(["vae", *TINY, "--epochs", "2", "--keep-epochs", "0,1", "--out", out,
                       "--data-dir", data_dir]) == 0
    assert {p.name for p in (tmp_path / "r").glob("epoch_*.pt")} == {"epoch_0.pt", "epoch_1.pt"}
    capsys.readouterr()
    results = {}
    for ckpt in ("epoch_0.pt", "epoch_1.pt", None):
        args = [out, "--k", "2", "--limit", "8", "--json"] + (["--checkpoint", ckpt] if ckpt else [])
        assert eval_main(args) == 0
        results[ckpt] = json.loads(capsys.readouterr().out)["elbo"]
    assert results["epoch_0.pt"] < results["epoch_1.pt"] < results[None]  # training helps
    assert (tmp_path / "r" / "eval_test_epoch_0.json").exists()
    code = eval_main([out, "--checkpoint", "epoch_9.pt"])
    assert one_line_error(capsys, code).startswith(
        f"genlab-eval: error: {out} has no checkpoint 'epoch_9.pt' (it has best.pt, checkpoint.pt, epoch_0.pt")


def test_ctrl_c_saves_and_resume_finishes(tmp_path, data_dir):
    import signal
    import time

    out = tmp_path / "r"
    cmd = [sys.executable, "-m", "inference", "vae", "--latent-dim", "2", "--hidden", "16",
           "--limit", "4000", "--batch-size", "8", "--epochs", "3", "--quiet", "--out", str(out),
           "--data-dir", data_dir]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and err.startswith("genlab-train: error: interrupted at epoch ")
    assert "continue with --resume" in err
    r = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert read_epochs(out) == [1, 2, 3]


def read_epochs(out):
    from inference.runner import read_metrics

    return [int(m["epoch"]) for m in read_metrics(out)]
