"""What a new user hits, on the training side (issue 13): divergence stops with the last good
checkpoint and resumes at a smaller learning rate; damaged config files; one writer per run;
mid-epoch checkpoints that resume exactly; stale results moved aside; said, not silent."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from inference.cli import main as train_main
from inference.runner import Diverged, RunConfig, Trainer, read_metrics, train
from models.common import GenlabError
from models.hetero import hetero_args


def hetero(**kw):
    base = dict(system="hetero", system_args=hetero_args(variant="hetero", hidden=[8]),
                data_args=dict(dataset="wiggles", n_train=60, n_valid=30, n_test=40, data_seed=0),
                epochs=3, batch_size=20, lr=1e-2, seed=0)
    base.update(kw)
    return RunConfig(**base)


def steps_of(path):
    return (path / "steps.csv").read_text()


def one_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1]


def test_a_huge_learning_rate_stops_with_exit_3_and_resumes_at_a_smaller_one(tmp_path, capsys):
    out = str(tmp_path / "r")
    argv = ["hetero", "--out", out, "--epochs", "3", "--lr", "1e6", "--quiet", "--hidden", "8",
            "--n-train", "60", "--n-valid", "30", "--batch-size", "20"]
    assert train_main(argv) == 3
    line = one_line(capsys)
    assert line.startswith("genlab-train: error: ") and "last good checkpoint" in line
    assert "smaller --lr" in line
    # the same run continues from its last good checkpoint at a sane rate, and says so
    assert train_main(["hetero", "--out", out, "--resume", "--lr", "1e-3", "--quiet"]) == 0
    assert "learning rate changed from 1e+06 to 0.001" in capsys.readouterr().err
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["lr"] == 1e-3 and len(read_metrics(tmp_path / "r")) == 3


def test_finite_but_absurd_divergence_is_stopped(tmp_path):
    """One full batch at lr 1e6: the objective stays finite but runs to absurd values."""
    with pytest.raises(Diverged, match=r"fell to .* below .*the first step's .* training diverged"):
        train(hetero(batch_size=60, lr=1e6, epochs=20), tmp_path / "r", progress=False)


def test_damaged_config_is_restored_from_the_checkpoint(tmp_path, capsys):
    train(hetero(epochs=1), tmp_path / "r", progress=False)
    path = tmp_path / "r" / "config.json"
    good = json.loads(path.read_text())
    path.write_text(path.read_text()[:40])  # truncated
    assert RunConfig.read(tmp_path / "r").epochs == 1
    assert "was damaged (JSONDecodeError); restored it from checkpoint.pt" in capsys.readouterr().err
    assert json.loads(path.read_text()) == good
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "config.json").write_text("{")
    with pytest.raises(GenlabError, match="is damaged .* and no checkpoint holds the run's config"):
        RunConfig.read(tmp_path / "lone")


LOCK_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, b"4242")
print("locked", flush=True)
time.sleep(30)
"""


def test_a_second_writer_is_refused_and_a_dead_one_leaves_no_lock(tmp_path):
    out = tmp_path / "r"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(GenlabError, match=r"is being written by another process \(pid 4242\)"):
            train(hetero(epochs=1), out, progress=False)
    finally:
        holder.kill()  # as kill -9: the OS drops the lock with the process
        holder.wait()
        holder.stdout.close()
    train(hetero(epochs=1), out, progress=False)
    train(hetero(epochs=2), out, resume=True, progress=False)  # released after each run


class Crash(Exception):
    pass


def test_checkpoint_every_resumes_bit_identically_after_a_crash(tmp_path, monkeypatch):
    train(hetero(), tmp_path / "whole", progress=False)
    cfg = hetero(checkpoint_every="2")
    real = Trainer.step

    def crashing(self, idx):  # kill -9 after global step 7: nothing is saved at the crash
        if self.st.global_step == 7:
            raise Crash()
        return real(self, idx)

    monkeypatch.setattr(Trainer, "step", crashing)
    with pytest.raises(Crash):
        train(cfg, tmp_path / "parts", progress=False)
    monkeypatch.setattr(Trainer, "step", real)
    from inference.runner import load_checkpoint

    assert load_checkpoint(tmp_path / "parts" / "checkpoint.pt")["loop"]["global_step"] == 6
    train(cfg, tmp_path / "parts", resume=True, progress=False)
    assert steps_of(tmp_path / "whole") == steps_of(tmp_path / "parts")
    with pytest.raises(GenlabError, match="--checkpoint-every takes a number of steps"):
        hetero(checkpoint_every="often").check()


def test_resume_moves_stale_results_aside_and_says_what_happened(tmp_path, capsys):
    out = tmp_path / "r"
    train(hetero(epochs=1, limit=10_000), out, progress=False)
    err = capsys.readouterr().err
    assert "--limit 10000 exceeds the 60 training datapoints; using all 60" in err
    assert json.loads((out / "config.json").read_text())["limit"] == 60
    (out / "eval_test.json").write_text("{}")
    (out / "figures").mkdir()
    train(hetero(epochs=1, limit=60), out, resume=True, progress=False)
    assert "nothing was trained" in capsys.readouterr().err
    assert (out / "eval_test.json").exists()  # nothing trained: still current
    train(hetero(epochs=2, limit=60), out, resume=True, progress=False)
    assert "to " + str(out / "stale-epoch1") in capsys.readouterr().err
    assert not (out / "eval_test.json").exists()
    assert (out / "stale-epoch1" / "eval_test.json").exists()
    assert (out / "stale-epoch1" / "figures").is_dir()


def test_a_piped_log_gets_periodic_progress_lines_with_an_eta():
    import io

    from inference.progress import LineProgress

    buf = io.StringIO()
    bar = LineProgress(4, "job", "steps", every=0.0, stream=buf)
    for _ in range(4):
        bar.update(1)
    bar.close()
    lines = buf.getvalue().splitlines()
    assert lines[0].startswith("job: 1/4 steps (25 %), ") and ", ETA " in lines[0]
    assert lines[-1].startswith("job: 4/4 steps (100 %)")


def test_a_named_schedule_sets_every_epochs_learning_rate_and_adams_settings(tmp_path):
    from inference.schedules import get_schedule

    s = get_schedule("burda", 4)
    train(hetero(schedule="burda", passes=4, epochs=4, batch_size=20), tmp_path / "r",
          progress=False)
    assert [m["lr"] for m in read_metrics(tmp_path / "r")] == pytest.approx(s.lrs(), rel=1e-12)
    state = __import__("torch").load(tmp_path / "r" / "checkpoint.pt", weights_only=False)
    assert state["optimizer"]["param_groups"][0]["eps"] == 1e-4
    with pytest.raises(GenlabError, match="--passes compresses a --schedule"):
        hetero(passes=3).check()
    with pytest.raises(GenlabError, match="sets its own optimizer"):
        hetero(schedule="burda", optimizer="clipped_adam").check()


def test_no_library_noise_in_the_output(tmp_path, capfd):
    """Pyro logs its max_plate_nesting guess at INFO on stderr; genlab's output stays clean."""
    train(hetero(epochs=1, k=3), tmp_path / "r", progress=False)
    out, err = capfd.readouterr()
    assert "Guessed max_plate_nesting" not in out + err
