"""The report: DIR/report.md, DIR/tables/<name>.{csv,md,tex}, DIR/plots/*.png.

CSV tables hold the raw numbers (NaN = not reached / not available); the markdown and LaTeX
(booktabs) tables hold the same rows formatted: mean ± std, "n/r" = not reached.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from . import plots
from .compare import PLATEAU_EPOCHS, build_tables
from .load import load

SPEEDUP_NOTE = ("FNGD speedup = TTT(optimizer) / TTT(FNGD), per seed (equal seeds paired), then mean ± std over "
                "seeds; \"> x\": that optimizer missed the target in some seed (its total time counts: a lower "
                "bound), \"< x\": FNGD missed it (an upper bound), \"n/r\": not reached by either.")


def _num(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, (bool, str)):
        return str(x)
    x = float(x)
    if x.is_integer() and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.4g}"


def _pm(mean, std) -> str:
    """mean (4 significant digits) ± std (2)."""
    if std is None or math.isnan(std) or math.isnan(mean):
        return _num(mean)
    return f"{_num(mean)} ± {std:.0f}" if std >= 100 else f"{_num(mean)} ± {std:#.2g}".rstrip(".")


def _ttt(mean, std, reached: int, runs: int) -> str:
    if reached == 0:
        return "n/r"
    if math.isnan(mean):
        return "n/a"  # reached, but the log has no times (timm summary.csv)
    return _pm(mean, std) + ("" if reached == runs else f" ({reached}/{runs} reached)")


def _speed(mean, std, bound: str) -> str:
    if bound == "ref":
        return "(FNGD)"
    if bound in ("n/r", "n/a"):
        return bound
    return _pm(mean, std) if bound == "=" else f"{bound} {_num(mean)}"


def _runs(r) -> str:
    return f"{r['runs']}" + (f" ({r['partial']} partial)" if r["partial"] else "")


def shown(name: str, t: pd.DataFrame) -> pd.DataFrame:
    """The formatted (string) version of table ``name``."""
    if t.empty:
        return t.astype(str)
    rows = []
    for _, r in t.iterrows():
        if name == "headline":
            rows.append({"task": r["task"], "optimizer": r["optimizer"], "config": r["config"], "seeds": _runs(r),
                         "metric": r["metric"], "final": _pm(r["final"], r["final_std"]),
                         "time to target (s)": _ttt(r["ttt_time"], r["ttt_time_std"], r["reached"], r["runs"]),
                         "epochs to target": _ttt(r["ttt_epoch"], r["ttt_epoch_std"], r["reached"], r["runs"]),
                         "time to loose target (s)": _ttt(r["ttt_time_loose"], r["ttt_time_loose_std"],
                                                          r["reached_loose"], r["runs"]),
                         "FNGD speedup (time)": _speed(r["speedup_time"], r["speedup_time_std"],
                                                       r["speedup_time_bound"]),
                         "FNGD speedup (epochs)": _speed(r["speedup_epochs"], r["speedup_epochs_std"],
                                                         r["speedup_epochs_bound"])})
        elif name == "final":
            extra = {c[6:]: _pm(r[c], r[f"{c}_std"]) for c in t.columns if c.startswith("final_") and c != "final_std"
                     and not c.endswith("_std")}
            rows.append({"task": r["task"], "optimizer": r["optimizer"], "config": r["config"],
                         "best": "*" if r["best"] else "", "seeds": _runs(r),
                         "metric": r["metric"], "final": _pm(r["final"], r["final_std"]), **extra})
        elif name == "ablation":
            rows.append({"task": r["task"], "config": r["config"], "best": "*" if r["best"] else "",
                         "seeds": _runs(r), "final": _pm(r["final"], r["final_std"]),
                         "time to target (s)": _ttt(r["ttt_time"], r["ttt_time_std"], r["reached"], r["runs"]),
                         "epochs to target": _ttt(r["ttt_epoch"], r["ttt_epoch_std"], r["reached"], r["runs"]),
                         "collect epoch (s)": _num(r["collect_epoch_time"]),
                         "reuse epoch (s)": _num(r["reuse_epoch_time"])})
        elif name == "speedups":
            rows.append({"task": r["task"], "over": r["optimizer"], "unit": r["unit"], "seeds": r["seeds"],
                         "FNGD speedup": _speed(r["speedup"], r["std"], r["bound"])})
        elif name == "speedups_by_target":
            rows.append({"task": r["task"], "target": f"{r['target']} = {_num(r['value'])}", "FNGD": r["fngd"],
                         "over": r["over"], "unit": r["unit"], "seeds": r["seeds"],
                         "speedup": _speed(r["speedup"], r["std"], r["bound"]),
                         "reached (FNGD / other)": f"{r['fngd_reached']} / {r['over_reached']}"})
        elif name == "convergence":
            rows.append({"task": r["task"], "optimizer": r["optimizer"], "epochs": r["epochs"],
                         f"seed-mean at epoch E-{PLATEAU_EPOCHS}": _num(r["before"]),
                         "at the last epoch E": _num(r["at_last"]), "relative gain": f"{100 * r['gain']:.2f}%",
                         "peak": _num(r["peak"]), "plateaued (< 1%)": "yes" if r["plateaued"] else "no"})
        elif name == "speedup_seeds":
            rows.append({"task": r["task"], "over": r["optimizer"], "unit": r["unit"], "seed": _num(r["seed"]),
                         "FNGD speedup": _speed(r["speedup"], math.nan, r["bound"])})
        elif name == "runs":
            rows.append({"task": r["task"], "optimizer": r["optimizer"], "config": r["config"], "seed": _num(r["seed"]),
                         "status": r["status"], "epochs": _num(r["epochs"]), "final": _num(r["final"]),
                         "time to target (s)": _num(r["ttt_time"]) if r["reached"] else "n/r",
                         "epochs to target": _num(r["ttt_epoch"]) if r["reached"] else "n/r",
                         "total time (s)": _num(r["total_time"])})
        elif name == "epoch_cost":
            rows.append({"task": r["task"], "optimizer": r["optimizer"], "phase": r["phase"], "epochs": r["epochs"],
                         "epoch (s)": _num(r["epoch_time"]), "step (s)": _num(r["step_time"]),
                         "epoch / SGD": _num(r["epoch_time_vs_sgd"]), "step / SGD": _num(r["step_time_vs_sgd"])})
        else:
            rows.append({k: _num(v) for k, v in r.items()})
    return pd.DataFrame(rows)


def latex(table: pd.DataFrame) -> str:
    """A booktabs LaTeX tabular of a formatted table."""
    st = table.astype(str).style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
    tex = st.to_latex(hrules=True, column_format="l" * table.shape[1])
    for a, b in (("±", r"$\pm$"), (">", r"\textgreater{}"), ("<", r"\textless{}"), ("–", "--"), ("×", r"$\times$")):
        tex = tex.replace(a, b)
    return tex


def markdown(table: pd.DataFrame) -> str:
    return table.to_markdown(index=False, disable_numparse=True) if len(table.columns) else "(none)"


def report(paths: Iterable[str | Path], out: str | Path, targets: dict[str, float] | None = None,
           title: str | None = None) -> dict[str, pd.DataFrame]:
    """Load ``paths``, compare, write the report under ``out``; returns the raw tables (see
    ``compare.build_tables``) plus ``data`` (the tidy per-epoch table) and ``skipped`` (file, reason)."""
    paths, out = [str(p) for p in paths], Path(out)
    df, skipped = load(paths)
    for task in sorted(set(targets or {}) - set(df["task"])):
        warnings.warn(f"--target {task}=...: no such task (tasks: {', '.join(sorted(df['task'].unique()))})",
                      stacklevel=2)
    tables = build_tables(df, targets)
    (out / "tables").mkdir(parents=True, exist_ok=True)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    md = {}
    for name, raw in tables.items():
        table = shown(name, raw)
        raw.to_csv(out / "tables" / f"{name}.csv", index=False)
        md[name] = markdown(table)
        (out / "tables" / f"{name}.md").write_text(md[name] + "\n")
        (out / "tables" / f"{name}.tex").write_text(latex(table))
    df.to_csv(out / "tables" / "data.csv", index=False)
    curve_files = plots.curves(df, tables["runs"], out / "plots")
    cost_files = plots.costs(tables["epoch_cost"], out / "plots")

    def images(files: list[Path]) -> str:
        return "\n\n".join(f"![{f.stem}](plots/{f.name})" for f in files)

    records = sum(str(s).endswith(".json") for s in df["source"].unique())
    text = [
        f"# {title or 'FNGD comparison'}",
        f"{df['source'].nunique()} runs ({records} run records, {df['source'].nunique() - records} host logs), "
        f"tasks {', '.join(sorted(df['task'].unique()))}, read from {', '.join(f'`{p}`' for p in paths)}."
        + ("\n\nSkipped files:\n" + "\n".join(f"- `{f}`: {why}" for f, why in skipped) if skipped else ""),
        "## Headline",
        "Each optimizer at its best configuration (best seed-mean final validation metric). Final = the last "
        "validation metric, mean ± std over seeds. Time to target = cumulative training seconds (validation "
        "excluded) at the end of the first epoch that reaches the task's target, mean ± std over the seeds that "
        f"reached it; n/r = not reached. {SPEEDUP_NOTE}",
        md["headline"],
        "## Targets",
        "Default target: 0.98 × the best seed-mean validation metric any optimizer reached (max-mode metrics), "
        "1.02 × the lowest (min-mode); seed-mean = mean over seeds of one configuration at one epoch. The loose "
        "target (0.95 ×, 1.05 ×) is the headline's second time column.",
        md["targets"],
        "## Curves",
        "Best configuration per optimizer; line = mean over seeds, band = ± std (time axis: seeds interpolated "
        "onto a common grid).",
        images(curve_files),
        "## Final metric, every configuration",
        "`*` = the optimizer's best configuration; partial = run killed or still going (counted with its last "
        "complete epoch).",
        md["final"],
        "## FNGD speedup",
        md["speedups"],
        "### At targets every optimizer reaches",
        "The worst optimizer's best seed-mean validation metric and the AdamW baseline's best are reached by "
        "every best configuration's seed-mean curve, so the speedups there are numbers (TTT(other) / TTT(FNGD) "
        "per seed, mean ± std over seeds); reached = seeds that reached the target, of the seeds run.",
        md["speedups_by_target"],
        "Per seed:",
        md["speedup_seeds"],
        "## Convergence",
        f"Seed-mean validation metric of each best configuration at its last epoch E and at E-{PLATEAU_EPOCHS}; "
        "plateaued = relative gain below 1%, the rule the epoch budgets are held to.",
        md["convergence"],
        "## Cost per epoch and step",
        "Median over the epochs of the best configurations, by FNGD phase; relative to SGD's median.",
        md["epoch_cost"],
        images(cost_files),
        "## FNGD ablation",
        "Every FNGD configuration; collect/reuse epoch = median epoch time in that phase.",
        md["ablation"],
        "## Runs",
        md["runs"],
    ]
    (out / "report.md").write_text("\n\n".join(text) + "\n")
    return {**tables, "data": df, "skipped": pd.DataFrame(skipped, columns=["file", "reason"])}
