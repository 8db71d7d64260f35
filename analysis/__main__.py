"""python -m fngd_analysis PATH [PATH...] --out DIR [--target TASK=VALUE ...] [--title TITLE]"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .load import NoRunsError
from .output import report

EPILOG = """\
inputs: record.json run records (fngd-run/1), timm summary.csv output dirs, fairseq --log-format json logs
(*.log); directories are searched recursively. Unreadable files are reported and skipped.

definitions:
  target (default)  0.98 x the best seed-mean validation metric any optimizer reached, for max-mode metrics
                    (top1, BLEU); 1.02 x the lowest for min-mode metrics (losses); a loose target, 0.95 x
                    (1.05 x), is the headline's second time column. Seed-mean = mean over
                    the seeds of one (optimizer, configuration) at one epoch. --target TASK=VALUE overrides.
  time to target    cumulative training seconds (validation excluded) and epochs at the end of the first
                    epoch whose validation metric reaches the target; "n/r" = not reached.
  best config       per optimizer, the hyper-parameter configuration with the best seed-mean final metric.
  speedup           TTT(other) / TTT(FNGD) per seed (equal seeds paired), mean +- std over seeds; "> x"
                    when the other optimizer missed the target in some seed (its total time counts: a lower
                    bound), "< x" when FNGD missed it, "n/r" when neither reached it.

outputs: DIR/report.md, DIR/tables/*.{csv,md,tex}, DIR/plots/*.png; the headline table is printed."""


def _target(text: str) -> tuple[str, float]:
    task, sep, value = text.rpartition("=")
    try:
        if not sep or not task:
            raise ValueError
        return task, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected TASK=VALUE, e.g. digits=90") from None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fngd_analysis", epilog=EPILOG,
                                 description="Compare FNGD with KFAC, SGD and AdamW from training run records.",
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="record files, log files or directories")
    ap.add_argument("--out", type=Path, required=True, help="output directory")
    ap.add_argument("--target", type=_target, action="append", default=[], metavar="TASK=VALUE",
                    help="target validation metric of a task (repeatable; default: see below)")
    ap.add_argument("--title", help="report title")
    args = ap.parse_args(argv)
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        report(args.paths, args.out, targets=dict(args.target), title=args.title)
    except NoRunsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print((args.out / "tables" / "headline.md").read_text(), end="")
    print(f"\nreport: {args.out / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
