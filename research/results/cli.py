"""`python -m research.results run|job|status|collect|tables` (see the package docstring)."""

from __future__ import annotations

import argparse
import sys

import research.results as package
from research.results.collect import cmd_collect
from research.results.jobs import cmd_job
from research.results.plan import PLANS
from research.results.scheduler import cmd_run, cmd_status
from research.results.tables import cmd_tables


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m research.results", description=package.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the job graph")
    r.add_argument("--work", required=True)
    r.add_argument("--plan", default="gpu", choices=sorted(PLANS))
    r.add_argument("--weights", default=None, help="TF-Inception default_1.pt (evaluation waits until it exists)")
    r.add_argument("--data", default=None, help="reference images (default Fashion-MNIST train); waited for")
    r.add_argument("--until", type=float, default=0, help="stop scheduling after this many seconds")
    r.add_argument("--poll", type=float, default=2.0)
    r.add_argument("--timing", action="store_true", help="also time CIFAR-size reconstruction on its own GPU")
    r.add_argument("--detach-children", action="store_true")
    r.add_argument("--retry-failed", action="store_true", help="forget earlier failures and run those jobs again")
    r.add_argument("--only", nargs="+", default=[], metavar="PATTERN",
                   help="run only jobs matching these globs (and their dependencies), started in this order")
    j = sub.add_parser("job", help="run one job (the scheduler calls this)")
    j.add_argument("--work", required=True)
    j.add_argument("--plan", default="gpu", choices=sorted(PLANS))
    j.add_argument("--weights", default=None)
    j.add_argument("--data", default=None)
    j.add_argument("name")
    s = sub.add_parser("status")
    s.add_argument("--work", required=True)
    c = sub.add_parser("collect")
    c.add_argument("--work", required=True)
    c.add_argument("--out", required=True)
    t = sub.add_parser("tables", help="markdown tables from results.json")
    t.add_argument("--results", required=True, nargs="+", help="results.json of one or more runs (later wins)")
    t.add_argument("--md", default=None, help="rewrite the tables between the markers of this file")
    a = ap.parse_args(argv)
    return {"run": cmd_run, "job": cmd_job, "status": cmd_status, "collect": cmd_collect,
            "tables": cmd_tables}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
