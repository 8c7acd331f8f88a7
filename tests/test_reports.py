"""The reports' declared options, the command lines generated from them, and the figures'
conventions (no overwriting, titles, labels) — none of it needs a trained run."""

import inspect
import json
import time
from dataclasses import fields
from types import SimpleNamespace

import numpy as np
import pytest

from evaluation import plotting
from evaluation.api import EvalOptions
from evaluation.cli import build_compare_parser, build_parser
from evaluation.cli import main as eval_main
from evaluation.reports import REPORTS, dirichlet, hetero, vae
from inference.runner import RunConfig
from inference.systems import SYSTEMS


def fake_run(path, system):
    """A directory that reads as a run of ``system`` (config.json only: no checkpoint)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"system": system}))
    return path


def one_line_error(capsys, code):
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    return err[0]


# ----------------------------------------------------------------------------- declared options
@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_every_report_declares_its_options(system):
    module = REPORTS[system]
    assert issubclass(module.Options, EvalOptions)
    for cls in (module.Options, getattr(module, "CompareOptions", module.Options)):
        assert all(f.metadata.get("help") for f in fields(cls)), cls
        cls()  # every default is valid
    # the report reads only declared fields: no getattr with a fallback on the options
    source = inspect.getsource(module)
    assert "getattr(options" not in source and "_opt(" not in source


@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_flags_and_help_come_from_the_options(system):
    module = REPORTS[system]
    parser = build_parser(module.Options, system)
    flags = {s for a in parser._actions for s in a.option_strings}
    for f in fields(module.Options):
        assert "--" + f.name.replace("_", "-") in flags
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    if hasattr(module, "compare"):
        cparser = build_compare_parser(module.CompareOptions, system)
        assert all(a.help for a in cparser._actions), [a.dest for a in cparser._actions if not a.help]
        assert "--out" in {s for a in cparser._actions for s in a.option_strings}


def test_help_without_a_run_mentions_compare_and_report_options(capsys):
    with pytest.raises(SystemExit) as e:
        eval_main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "compare RUN_A RUN_B" in out and "depend on the run's system" in out
    assert "RUN_DIR --help" in out and "--digit" in out and "--vae-run" in out
    with pytest.raises(SystemExit) as e:
        eval_main(["compare", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--out" in out and "--fixed-p" in out


def test_help_of_a_run_lists_its_reports_options(tmp_path, capsys):
    run = fake_run(tmp_path / "v", "vae")
    with pytest.raises(SystemExit):
        eval_main([str(run), "--help"])
    out = capsys.readouterr().out
    assert "options of the vae report" in out and "--digit DIGIT" in out
    assert "most and least likely" in out and "(default 6)" in out
    assert "--baseline" not in out  # the cvae's


def test_another_systems_option_is_refused(tmp_path, capsys):
    run = fake_run(tmp_path / "h", "hetero")
    with pytest.raises(SystemExit) as e:
        eval_main([str(run), "--report", "--digit", "3"])
    assert "unrecognized arguments: --digit 3" in one_line_error(capsys, e.value.code)


def test_a_report_option_needs_report(tmp_path, capsys):
    run = fake_run(tmp_path / "v", "vae")
    code = eval_main([str(run), "--digit", "3"])
    assert one_line_error(capsys, code) == ("genlab-eval: error: --digit is an option of the "
                                            "report: add --report")


def test_run_dir_after_a_report_flag_is_found(tmp_path, capsys):
    run = fake_run(tmp_path / "v", "vae")
    code = eval_main(["--digit", "12", "--report", str(run)])
    assert one_line_error(capsys, code) == "genlab-eval: error: --digit must be a digit class 0-9, got 12"


# ----------------------------------------------------------------------------- checked before work
def test_bogus_baseline_fails_fast(tmp_path, capsys):
    run = fake_run(tmp_path / "c", "cvae")  # no checkpoint: any work would fail differently
    start = time.perf_counter()
    code = eval_main([str(run), "--report", "--baseline", str(tmp_path / "nope")])
    assert one_line_error(capsys, code) == (
        f"genlab-eval: error: --baseline {tmp_path / 'nope'} is not a run directory (no config.json)")
    other = fake_run(tmp_path / "h", "hetero")
    code = eval_main([str(run), "--report", "--baseline", str(other)])
    assert one_line_error(capsys, code) == f"genlab-eval: error: {other} holds a 'hetero' run, not 'vae'"
    assert time.perf_counter() - start < 10
    assert not list(run.glob("eval_*"))  # nothing was evaluated


def test_vae_run_is_explicit_and_checked(tmp_path, capsys):
    from evaluation.reports import pixelrnn

    assert pixelrnn.Options().vae_run is None
    assert "vae-d20" not in inspect.getsource(pixelrnn)  # never a silently used sibling
    run = fake_run(tmp_path / "p", "pixelrnn")
    code = eval_main([str(run), "--k", "1", "--report", "--vae-run", str(tmp_path / "nope")])
    assert one_line_error(capsys, code) == (
        f"genlab-eval: error: --vae-run {tmp_path / 'nope'} is not a run directory (no config.json)")


def test_compare_refuses_mixed_systems_and_systems_without_compare(tmp_path, capsys):
    a, b = fake_run(tmp_path / "a", "vae"), fake_run(tmp_path / "b", "hetero")
    code = eval_main(["compare", str(a), str(b)])
    assert one_line_error(capsys, code) == (
        "genlab-eval compare: error: compare needs runs of one system, got ['hetero', 'vae']")
    c1, c2 = fake_run(tmp_path / "c1", "cvae"), fake_run(tmp_path / "c2", "cvae")
    code = eval_main(["compare", str(c1), str(c2)])
    assert one_line_error(capsys, code) == (
        "genlab-eval compare: error: there is no comparison for system 'cvae' yet")


# ----------------------------------------------------------------------------- figures
def _figure():
    fig, ax = plotting.plt.subplots()
    ax.plot([0, 1])
    return fig


def test_save_moves_an_earlier_figure_aside(tmp_path):
    plotting.take_moved()
    first = plotting.save(_figure(), tmp_path, "same")
    before = first.read_bytes()
    assert plotting.take_moved() == []
    second = plotting.save(_figure(), tmp_path, "same")
    assert second == first and second.exists()
    moved = plotting.take_moved()
    assert len(moved) == 1 and moved[0].parent == tmp_path / "figures" / "old"
    assert moved[0].name.startswith("same.") and moved[0].read_bytes() == before
    plotting.save(_figure(), tmp_path, "same")  # a third: a second old copy, none lost
    assert len(list((tmp_path / "figures" / "old").glob("same.*.png"))) == 2


def test_run_title_names_fields_without_float_noise():
    cfg = RunConfig(system="dirichlet", data_args=dict(alpha=[1.2999999523162842] * 3, symbols=100,
                                                       sequences=1, p=None))
    title = plotting.run_title(cfg, "x")
    assert "alpha=[1.3, 1.3, 1.3] symbols=100 sequences=1" in title and "/" not in title


def _fake_estimate(n=200, seed=0):
    g = np.random.default_rng(seed)
    elbo = g.normal(-100, 10, n)
    iwae = {k: elbo + np.log(k) for k in (1, 10, 100)}
    return SimpleNamespace(iwae=iwae, elbo=elbo, n=n, log_marginal=iwae[100], num_samples=100,
                           khat=g.uniform(0.3, 1.2, n))


def test_elbo_vs_iwae_labels_and_legends():
    cfg = RunConfig(system="vae", system_args=dict(latent_dim=2, hidden=[8]),
                    data_args=dict(dataset="mnist", binarization="dynamic"))
    fig = vae.bounds_figure(_fake_estimate(), cfg)
    ax, bx = fig.axes
    assert bx.get_ylabel() == "images"
    labels = [t.get_text() for t in bx.get_legend().get_texts()]
    assert any("0.5" in t for t in labels) and any("0.7" in t for t in labels)
    # the legends sit below the axes, where they can cover no point or label
    for a in (ax, bx):
        assert a.get_legend().get_bbox_to_anchor().y0 < a.get_window_extent().y0
    assert "vae d=2" in fig._suptitle.get_text()
    plotting.plt.close(fig)


def test_loglik_by_digit_small_multiples():
    cfg = RunConfig(system="vae", system_args=dict(latent_dim=2, hidden=[8]),
                    data_args=dict(dataset="mnist", binarization="dynamic"))
    est = _fake_estimate(300)
    labels = np.arange(300) % 10
    fig = vae.loglik_by_digit_figure(est.log_marginal, labels, cfg, 100)
    assert len(fig.axes) == 10
    shared = fig.axes[0].get_shared_x_axes()
    assert all(shared.joined(fig.axes[0], a) for a in fig.axes)
    assert "by digit" in fig._suptitle.get_text() and "vae d=2" in fig._suptitle.get_text()
    plotting.plt.close(fig)


def test_dips_title_says_what_it_shows():
    cfg = SimpleNamespace(data_args={})
    n = 30
    ll = np.linspace(-1, 0, n)
    ll[10] -= 3
    steps = {"step": np.arange(n, dtype=float), "loglik": ll, "min_sigma": np.ones(n),
             "drop_resid": np.ones(n), "drop_sigma": np.full(n, 0.1), "drop_x": np.zeros(n),
             "drop_delta": -np.ones(n), "drop_small_sigma_share": np.full(n, 0.5),
             "drop_top10_share": np.full(n, 0.6)}
    fig = hetero.dips_figure("hetero lr=0.01", steps, cfg, "RUN TITLE")
    title = fig._suptitle.get_text()
    assert "fell by more than 0.5 nats/point (dips)" in title and "RUN TITLE" in title
    plotting.plt.close(fig)


def test_conjugate_figure_has_no_offset_axis():
    checks = dict(learned=[[10.0, 20.0]], exact=[[10.5, 19.5]], kl_total=0.001, sequences=1,
                  iwae={1: -106.74, 10: -106.70, 100: -106.69}, log_evidence=-106.68,
                  elbo_closed=-106.75, gap_closed=0.07, elbo_mc=-106.74)
    fig = dirichlet.plot_conjugate(checks, "TITLE")
    right = fig.axes[1]
    fig.canvas.draw()
    assert right.yaxis.get_major_formatter().get_useOffset() is False
    assert right.yaxis.get_offset_text().get_text() == ""
    assert "conjugate checks" in fig._suptitle.get_text() and "TITLE" in fig._suptitle.get_text()
    plotting.plt.close(fig)
