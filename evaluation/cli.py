"""``python -m evaluation RUN_DIR`` (console script ``genlab-eval``): ELBO and IWAE of a run;
``python -m evaluation compare RUN_A RUN_B ...``: runs of one system side by side.

The flags come from dataclasses, the one source of their defaults and help:
:class:`evaluation.api.EvalOptions` for every run, and the ``Options`` (``CompareOptions``)
of the run's report (``evaluation.reports.<system>``).  Which report's flags exist depends on
the run, so RUN_DIR is read first (:func:`find_run_dirs`), then the full parser is built.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from dataclasses import fields
from pathlib import Path

from evaluation import plotting
from evaluation.ais import add_arguments as add_ais_arguments
from evaluation.ais import run_from_cli
from evaluation.api import EvalOptions, describe, evaluate, read_config
from evaluation.reports import REPORTS, get_report
from inference import distributed
from inference.cli import Parser, fail
from inference.importance import flush_denormals_in_process
from inference.systems import add_config_arguments
from models.common import GenlabError, fill_defaults

PROG = "genlab-eval"
EVAL_FIELDS = tuple(f.name for f in fields(EvalOptions))


def _report_flags(options_cls) -> list:
    """The flags a report adds to :class:`EvalOptions`, e.g. ``['--digit']``."""
    return ["--" + f.name.replace("_", "-") for f in fields(options_cls) if f.name not in EVAL_FIELDS]


def _wrap(text: str) -> str:
    return textwrap.fill(text, width=88)


def _systems_epilog(compare: bool) -> str:
    lines = []
    for system, module in REPORTS.items():
        if compare and not hasattr(module, "compare"):
            continue
        flags = _report_flags(module.CompareOptions if compare else module.Options)
        lines.append(textwrap.fill(" ".join(flags) if flags else "(none beyond the above)",
                                   width=88, initial_indent=f"  {system:<11}",
                                   subsequent_indent=" " * 13))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- one run
def add_output_flags(p) -> None:
    """What to do with the estimate (not evaluation options: they change no number)."""
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--report", action="store_true",
                   help="also draw the system's figures into RUN_DIR/figures/ (an earlier "
                        "figure of the same name is moved to RUN_DIR/figures/old/)")


def build_parser(options_cls=EvalOptions, system=None) -> argparse.ArgumentParser:
    """The command line for one run; ``options_cls`` is the run's report's ``Options``."""
    if system is None:
        epilog = _wrap("The options of --report depend on the run's system: "
                       f"'{PROG} RUN_DIR --help' lists them, with their help, for that run. "
                       "By system:") + "\n" + _systems_epilog(compare=False) + "\n\n"
    else:
        epilog = ""
    epilog += _wrap(f"To compare runs of one system: '{PROG} compare RUN_A RUN_B ...' (see "
                    f"'{PROG} compare --help').")
    p = Parser(prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
               description=_wrap("Estimate log p(x) of a trained run by importance sampling "
                                 "with its guide (IWAE) beside the ELBO; per-datapoint values "
                                 "are saved to RUN_DIR/eval_<split>.npz." + (
                                     f" This run is a {system} run." if system else "")))
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by genlab-train")
    add_config_arguments(p.add_argument_group("evaluation"), EvalOptions)
    add_ais_arguments(p.add_argument_group("AIS and BDMC (instead of the IWAE estimate)"))
    add_output_flags(p)
    if options_cls is not EvalOptions:
        group = p.add_argument_group(f"options of the {system} report (with --report)")
        add_config_arguments(group, options_cls, skip=EVAL_FIELDS)
    return p


def format_table(summary: dict, cfg) -> str:
    joint = not summary["per_datapoint"]

    def row(name, v):
        se = "" if joint or v["se"] != v["se"] else f" ± {v['se']:.3f}"
        return f"  {name:<16}{v['mean']:>12.3f}{se}"

    unit = ("one joint value over all datapoints, nats" if joint
            else "nats per datapoint, mean ± standard error")
    lines = [describe(cfg),
             f"{summary['split']} split, n = {summary['n']}, K = {summary['num_samples']}, "
             f"seed {summary['seed']}; {unit}",
             row("ELBO", summary["elbo"])]
    for k, v in summary["iwae"].items():
        lines.append(row(f"IWAE k={k}", v))
    lines.append(row("gap IWAE-ELBO", summary["gap"]))
    if "psis" in summary:
        lines.append(row(f"PSIS k={summary['num_samples']}", summary["psis"]))
    share = "of datapoints" if not joint else "(the joint weight)"
    undefined = summary.get("khat_undefined", 0.0)
    lines.append(f"  k-hat > 0.5 for {100 * summary.get('khat_gt_0.5', float('nan')):.1f} % {share} "
                 "(raw IWAE untrustworthy there), > 0.7 for "
                 f"{100 * summary['khat_gt_0.7']:.1f} % (PSIS untrustworthy too)"
                 + (f", undefined for {100 * undefined:.1f} %" if undefined else "")
                 + f"; mean ESS {summary['ess_mean']:.1f} of {summary['num_samples']}")
    if joint:
        lines.append(f"  note: {summary['summed']}")
    return "\n".join(lines)


def options_from(ns: argparse.Namespace, options_cls):
    """The options dataclass from parsed flags (a flag not given takes the field's default);
    its checks run here, before any work."""
    return options_cls(**fill_defaults(options_cls, vars(ns)))


# ----------------------------------------------------------------------------- RUN_DIR first
class _PreparseError(Exception):
    pass


class _Preparser(argparse.ArgumentParser):
    def error(self, message):
        raise _PreparseError(message)


def find_run_dirs(argv, compare: bool = False) -> list:
    """The RUN_DIR argument(s) of ``argv``, before the report's flags are known: parsed with
    every report's flags, so that a flag's value is never taken for a run directory."""
    pre = _Preparser(add_help=False)
    pre.add_argument("run_dirs", nargs="*")
    add_output_flags(pre)
    seen = set()
    for module in REPORTS.values():
        cls = getattr(module, "CompareOptions", None) if compare else module.Options
        if cls is None:
            continue
        add_config_arguments(pre, cls, skip=seen)
        seen |= {f.name for f in fields(cls)}
    try:
        ns, _ = pre.parse_known_intermixed_args(argv)
    except _PreparseError:
        return []
    return ns.run_dirs


def _run_system(run_dir):
    """(system, None), or (None, the GenlabError that says why RUN_DIR cannot be read)."""
    try:
        return read_config(run_dir).system, None
    except GenlabError as e:
        return None, e


def script() -> int:
    """``python -m evaluation`` and ``genlab-eval``: :func:`main` in a process that flushes
    denormals in every thread (``inference.importance.flush_denormals_in_process``)."""
    flush_denormals_in_process()
    return main()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] == "compare":
        return compare_main(argv[1:])
    found = find_run_dirs(argv)
    system, problem = _run_system(found[0]) if found else (None, None)
    report = REPORTS.get(system)
    parser = build_parser(report.Options if report else EvalOptions, system)
    if problem is not None:  # the flags are checked first (argparse), then RUN_DIR
        parser.parse_known_args(argv)
        return fail(parser.prog, problem)
    ns = parser.parse_args(argv)
    try:
        options = options_from(ns, report.Options if report else EvalOptions)
        extra = [f for f in _report_flags(type(options)) if getattr(ns, f[2:].replace("-", "_")) is not None]
        if extra and not ns.report:
            raise GenlabError(f"{' '.join(extra)} {'is an option' if len(extra) == 1 else 'are options'} "
                              "of the report: add --report")
        if ns.estimator == "ais" or ns.bdmc:
            if ns.report:
                raise GenlabError("--report draws the IWAE figures; run it without "
                                  "--estimator ais / --bdmc")
            print(run_from_cli(ns, ns.run_dir))
            return 0
        ev = evaluate(ns.run_dir, options)
        if not distributed.current().main:  # under torchrun rank 0 reports and writes
            return 0
        figures = []
        if ns.report:
            plotting.take_moved()
            figures = get_report(ev.config.system).report(Path(ns.run_dir), ev.config, ev.system,
                                                          ev.data, ev.estimate, options)
    except GenlabError as e:
        return fail(parser.prog, e)
    print_result(ev, ns.json)
    out = sys.stderr if ns.json else sys.stdout
    for p in figures:
        print(f"figure: {p}", file=out)
    _say_moved(out)
    return 0


def print_result(ev, as_json: bool) -> None:
    summary = ev.summary
    if as_json:
        out = {"elbo": summary["elbo"]["mean"],
               "iwae": {str(k): v["mean"] for k, v in summary["iwae"].items()},
               "khat_gt_0.5": summary.get("khat_gt_0.5"), "khat_gt_0.7": summary["khat_gt_0.7"],
               "n": summary["n"], "summary": summary}
        print(json.dumps(out))
    else:
        print(format_table(summary, ev.config))


def _say_moved(out) -> None:
    moved = plotting.take_moved()
    if moved:
        folders = sorted({str(p.parent) for p in moved})
        print(f"{len(moved)} earlier figure(s) of the same name moved to {', '.join(folders)}",
              file=out)


# ----------------------------------------------------------------------------- compare
def build_compare_parser(options_cls=None, system=None) -> argparse.ArgumentParser:
    """The command line of ``compare``; ``options_cls`` is the report's ``CompareOptions``."""
    if system is None:
        epilog = _wrap("The runs' system adds its own options: "
                       f"'{PROG} compare RUN_A RUN_B --help' lists them, with their help, for "
                       "those runs. By system:") + "\n" + _systems_epilog(compare=True)
    else:
        epilog = None
    p = Parser(prog=f"{PROG} compare", formatter_class=argparse.RawDescriptionHelpFormatter,
               epilog=epilog,
               description=_wrap("Compare runs of one system on the same test datapoints: "
                                 "figures (by default in the first run's figures/ folder; an "
                                 "earlier figure of the same name is moved to figures/old/) "
                                 "and the headline numbers." + (
                                     f" These are {system} runs." if system else "")))
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+",
                   help="two or more run directories of one system")
    # no comparison reads a checkpoint other than each run's default, nor another device
    add_config_arguments(p.add_argument_group("evaluation"), EvalOptions,
                         skip=("checkpoint", "device"))
    if options_cls is not None:
        group = p.add_argument_group(f"options of the {system} comparison")
        add_config_arguments(group, options_cls, skip=EVAL_FIELDS)
    return p


def _compare_module(run_dirs):
    """The report module that compares ``run_dirs``, or a GenlabError saying why none does."""
    if len(run_dirs) < 2:
        raise GenlabError("compare needs at least two run directories")
    systems = set()
    for d in run_dirs:
        systems.add(read_config(d).system)
    if len(systems) != 1:
        raise GenlabError(f"compare needs runs of one system, got {sorted(systems)}")
    system = systems.pop()
    module = get_report(system)
    if not hasattr(module, "compare"):
        raise GenlabError(f"there is no comparison for system {system!r} yet")
    return system, module


def compare_main(argv) -> int:
    found = find_run_dirs(argv, compare=True)
    try:
        system, module = _compare_module(found)
        problem = None
    except GenlabError as e:
        system, module, problem = None, None, e
    parser = build_compare_parser(module.CompareOptions if module else None, system)
    if problem is not None:
        parser.parse_known_intermixed_args(argv)
        return fail(parser.prog, problem)
    ns = parser.parse_intermixed_args(argv)
    try:
        options = options_from(ns, module.CompareOptions)
        plotting.take_moved()
        paths = module.compare(ns.run_dirs, options)
    except GenlabError as e:
        return fail(parser.prog, e)
    for p in paths:
        print(p)
    _say_moved(sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
