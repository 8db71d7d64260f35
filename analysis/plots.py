"""Plots (matplotlib, drawn on Figure objects: no pyplot state, no backend switch).

* ``<task>-metric-vs-time.png`` / ``-vs-epoch.png``: validation metric of each optimizer's best
  configuration, the mean over seeds as a line and mean +- std as a band. On the time axis each
  seed's curve is linearly interpolated onto a common grid of 200 points over the stretch all its
  seeds cover (from the latest first epoch end to the earliest last one), and the seeds' own epoch
  ends are drawn as dots.
* ``<task>-epoch-cost.png``: median epoch time and step time by optimizer and phase.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def _name(task: str) -> str:
    return re.sub(r"[^\w.-]+", "_", task)


def _band(ax, x, curves: pd.DataFrame, label: str) -> str:
    mean, std = curves.mean(axis=1), curves.std(axis=1)
    (line,) = ax.plot(x, mean, label=label, lw=1.5)
    ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, lw=0)
    return line.get_color()


def curves(df: pd.DataFrame, runs: pd.DataFrame, out: Path) -> list[Path]:
    """Metric vs training time and vs epoch, one file each per task."""
    files = []
    best = runs[runs["best"]]
    for task, b in best.groupby("task", sort=False):
        d = df[df["source"].isin(b["source"])].dropna(subset=["val_metric"])
        for axis in ("time", "epoch"):
            fig = Figure(figsize=(6.4, 4.2), layout="constrained")
            ax = fig.subplots()
            for opt, r in b.groupby("optimizer", sort=False):
                o = d[d["source"].isin(r["source"])].dropna(subset=[axis])
                if o.empty:
                    continue
                label = f"{opt} ({r['source'].nunique()} seeds)"
                if axis == "epoch":
                    table = o.pivot_table(index="epoch", columns="source", values="val_metric")
                    _band(ax, table.index, table, label)
                else:
                    seeds = o.groupby("source")
                    lo, hi = seeds["time"].min().max(), seeds["time"].max().min()
                    if lo >= hi:  # no common stretch: the union, averaging whichever seeds cover a point
                        lo, hi = o["time"].min(), o["time"].max()
                    grid = np.linspace(lo, hi, 200)
                    table = pd.DataFrame({src: np.interp(grid, s["time"], s["val_metric"], left=np.nan, right=np.nan)
                                          for src, s in seeds}, index=grid)
                    color = _band(ax, grid, table, label)
                    ax.plot(o["time"], o["val_metric"], ".", color=color, alpha=0.5, ms=4)
            if not ax.lines:
                continue
            ax.axhline(b["target"].iloc[0], color="gray", ls="--", lw=1, label="target")
            metric, versus = b["metric"].iloc[0], "training time" if axis == "time" else "epoch"
            ax.set(xlabel="cumulative training time (s)" if axis == "time" else "epoch", ylabel=metric,
                   title=f"{task}: validation {metric} vs {versus}")
            ax.set_xlim(left=0)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            files.append(out / f"{_name(task)}-metric-vs-{axis}.png")
            fig.savefig(files[-1], dpi=110)
    return files


def costs(cost: pd.DataFrame, out: Path) -> list[Path]:
    """Bars of median epoch and step time by optimizer and phase, one file per task."""
    files = []
    for task, c in cost.groupby("task", sort=False):
        fig = Figure(figsize=(7.5, 3.6), layout="constrained")
        axes = fig.subplots(1, 2)
        labels = [f"{o}\n{p}" if p != "all" else o for o, p in zip(c["optimizer"], c["phase"])]
        for ax, col, title in zip(axes, ("epoch_time", "step_time"), ("median epoch time (s)", "median step time (s)")):
            ax.bar(range(len(c)), c[col], color=[f"C{i}" for i in pd.factorize(c["optimizer"])[0]])
            ax.set_xticks(range(len(c)), labels, fontsize=7)
            ax.set_title(title, fontsize=9)
            ax.grid(axis="y", alpha=0.3)
        fig.suptitle(f"{task}: cost by optimizer and phase", fontsize=10)
        files.append(out / f"{_name(task)}-epoch-cost.png")
        fig.savefig(files[-1], dpi=110)
    return files
