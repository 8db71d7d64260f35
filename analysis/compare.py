"""Comparison tables from the tidy per-epoch DataFrame of ``fngd_analysis.load``.

Definitions (per task; a task has one validation metric and direction, ``mode``):
  * final metric of a run: its last recorded validation metric. Partial runs (status running or
    failed: killed, still going) count with their last complete epoch; tables say how many.
  * target, default: 0.98 x the best seed-mean validation metric any optimizer reached for
    max-mode metrics (top1, BLEU), 1.02 x the lowest for min-mode metrics (a loss): a target only
    a well-tuned optimizer reaches, so that time to it discriminates. The seed-mean is the mean
    over the seeds of one (optimizer, configuration) at one epoch; the best is taken over all
    optimizers, configurations and epochs. Override per task: ``targets={"digits": 90}`` or
    ``--target digits=90``. A second, looser target (0.95 x / 1.05 x the same best) is reported
    beside it (``*_loose`` columns).
  * time-to-target (TTT) of a run: the cumulative training time (``time``: optimisation seconds,
    validation excluded) and the epoch number at the end of the first epoch whose validation
    metric reaches the target (>= for max, <= for min); NaN = not reached.
  * best configuration of an optimizer: its hyper-parameter configuration with the best
    seed-mean final metric (highest for max, lowest for min; a tie goes to the first label).
  * more targets, every one reached by the seed-mean curve of every optimizer's best
    configuration, so that speedups are numbers rather than bounds (``speedups_by_target``):
    "worst optimizer's best" (the lowest, over optimizers, of the best seed-mean validation metric
    of each best configuration; highest for min-mode) and "adamw's best" (the AdamW baseline's
    best seed-mean), beside "0.98 x best". A seed can still miss a target its mean reaches (bounds).
  * FNGD: every optimizer named ``fngd`` or ``fngd:VARIANT`` (a sweep's variant, e.g. fngd:adamw,
    is its own optimizer); the headline's speedup is the paper's ``fngd``'s, ``speedups_by_target``
    has one block per FNGD variant.
  * speedup of FNGD over optimizer X: TTT(X) / TTT(FNGD) for each seed, pairing equal seeds of the
    two best configurations, then mean +- std (ddof=1) over seeds; in time and in epochs. A seed
    where X never reached the target contributes the lower bound (X's total time) / TTT(FNGD), one
    where FNGD never did the upper bound TTT(X) / (FNGD's total time); the mean is then reported
    as "> m" (lower bounds only) or "< m" (upper bounds only). Seeds where neither reached, or
    bounds both ways, give "n/r" (not reached); missing times (host logs) give "n/a".
  * plateau (``convergence``): for each best configuration, the seed-mean validation metric at the
    last epoch E and at E - 3, and the relative gain between them (in the metric's direction);
    "plateaued" when it is below 1% (PLATEAU_GAIN): the rule the epoch budgets are held to.
  * epoch cost: median ``epoch_time`` of the best configurations' epochs by optimizer and FNGD
    phase (collect | reuse; "all" for optimizers without phases), step time = epoch_time / steps
    of the epoch, and both relative to the median of the optimizer named "sgd".
"""

from __future__ import annotations

import math
import warnings

import pandas as pd

FNGD, REFERENCE = "fngd", "sgd"
ORDER = ["fngd", "fngd:adamw", "kfac", "sgd", "adamw"]
BASELINE = "adamw"
PLATEAU_GAIN, PLATEAU_EPOCHS = 0.01, 3
DEFAULT_FACTOR = {"max": 0.98, "min": 1.02}
LOOSE_FACTOR = {"max": 0.95, "min": 1.05}


def default_targets(df: pd.DataFrame, factor: dict[str, float] = DEFAULT_FACTOR) -> dict[str, float]:
    """Task -> default target (see the module docstring)."""
    out = {}
    for task, d in df.groupby("task"):
        seed_mean = d.groupby(["optimizer", "config", "epoch"])["val_metric"].mean()
        mode = d["mode"].iloc[0]
        out[task] = factor[mode] * (seed_mean.max() if mode == "max" else seed_mean.min())
        if not out[task] > 0:
            warnings.warn(f"task {task}: default target is {out[task]} (no optimizer got its {d['metric'].iloc[0]} "
                          "above 0); give one with --target / targets=", stacklevel=2)
    return out


def _hits(valid: pd.DataFrame, mode: str, target: float) -> pd.DataFrame:
    return valid[valid["val_metric"] >= target] if mode == "max" else valid[valid["val_metric"] <= target]


def per_run(df: pd.DataFrame, targets: dict[str, float], loose: dict[str, float] | None = None) -> pd.DataFrame:
    """One row per run: final metric, totals, time-to-target (and to the ``loose`` target:
    ``*_loose`` columns), and whether the run is in its optimizer's best configuration (``best``)."""
    final_cols = [c for c in df.columns if c.startswith("final_")]
    loose = loose or {}
    rows = []
    for _, d in df.groupby("source", sort=False):
        first, valid = d.iloc[0], d.dropna(subset=["val_metric"])
        target = targets.get(first["task"], math.nan)
        loose_target = loose.get(first["task"], math.nan)
        hit, hit2 = _hits(valid, first["mode"], target), _hits(valid, first["mode"], loose_target)
        rows.append({**{k: first[k] for k in ("task", "metric", "mode", "optimizer", "config", "seed", "run")},
                     "status": first["status"], "partial": first["status"] in ("running", "failed"),
                     "epochs": d["epoch"].max(), "total_time": d["time"].iloc[-1],
                     "final": valid["val_metric"].iloc[-1] if len(valid) else math.nan,
                     "target": target, "reached": not hit.empty,
                     "ttt_time": hit["time"].iloc[0] if len(hit) else math.nan,
                     "ttt_epoch": hit["epoch"].iloc[0] if len(hit) else math.nan,
                     "target_loose": loose_target, "reached_loose": not hit2.empty,
                     "ttt_time_loose": hit2["time"].iloc[0] if len(hit2) else math.nan,
                     **{c: first[c] for c in final_cols}, "source": first["source"]})
    runs = pd.DataFrame(rows)
    runs["best"] = False
    means = runs.groupby(["task", "optimizer", "config"])["final"].mean().reset_index()
    for (task, opt), d in means.groupby(["task", "optimizer"]):
        ranked = d.dropna(subset=["final"])
        mode = runs.loc[runs["task"] == task, "mode"].iloc[0]
        pick = d.iloc[0] if ranked.empty else ranked.loc[ranked["final"].idxmax() if mode == "max"
                                                         else ranked["final"].idxmin()]
        chosen = (runs["task"] == task) & (runs["optimizer"] == opt) & (runs["config"] == pick["config"])
        runs.loc[chosen, "best"] = True
    return sort_optimizers(runs, ["task", "optimizer", "config", "seed", "run"])


def sort_optimizers(df: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Sort with the optimizers in the order fngd, kfac, sgd, adamw, then the others by name (time before epochs)."""
    def key(s: pd.Series) -> pd.Series:
        if s.name == "unit":
            return s.map({"time": 0, "epochs": 1})
        return s.map(lambda o: f"{ORDER.index(o) if o in ORDER else len(ORDER)}{o}") if s.name == "optimizer" else s
    return df.sort_values(by, key=key, ignore_index=True)


def stats(x: pd.Series) -> tuple[float, float, int]:
    """(mean, std with ddof=1 (NaN below 2 values), count) of the non-NaN values."""
    x = pd.to_numeric(x, errors="coerce").dropna()
    return (float(x.mean()) if len(x) else math.nan, float(x.std()) if len(x) > 1 else math.nan, len(x))


def _pair(row: pd.Series, ttt: str, total: str) -> tuple[float, str]:
    if row["reached_f"] and row["reached_o"]:
        return row[f"{ttt}_o"] / row[f"{ttt}_f"], "="
    if row["reached_f"]:
        return row[f"{total}_o"] / row[f"{ttt}_f"], ">"
    if row["reached_o"]:
        return row[f"{ttt}_o"] / row[f"{total}_f"], "<"
    return math.nan, "n/r"


def is_fngd(optimizer: str) -> bool:
    return optimizer.split(":")[0] == FNGD


def speedups(runs: pd.DataFrame, subject: str = FNGD) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per seed, aggregated over seeds) speedups of ``subject``'s (an FNGD) best configuration
    over each other (non-FNGD) optimizer's best configuration, in time and in epochs."""
    per_seed, agg = [], []
    best = runs[runs["best"]]
    for task, d in best.groupby("task"):
        d = d.dropna(subset=["seed"]).drop_duplicates(["optimizer", "seed"])  # only known seeds pair
        f = d[d["optimizer"] == subject]
        for opt, o in d[~d["optimizer"].map(is_fngd)].groupby("optimizer"):
            pairs = f.merge(o, on="seed", suffixes=("_f", "_o"))
            for unit, ttt, total in (("time", "ttt_time", "total_time"), ("epochs", "ttt_epoch", "epochs")):
                values, bounds = [], []
                for _, row in pairs.iterrows():
                    value, bound = _pair(row, ttt, total)
                    values.append(value)
                    bounds.append(bound)
                    per_seed.append({"task": task, "optimizer": opt, "unit": unit, "seed": row["seed"],
                                     "speedup": value, "bound": bound})
                mean, std, n = stats(pd.Series(values, dtype=float))
                kinds = set(bounds)
                if not bounds:
                    bound = "n/a"
                elif "n/r" in kinds or {">", "<"} <= kinds:
                    bound = "n/r"
                elif n < len(values):
                    bound = "n/a"
                else:
                    bound = ">" if ">" in kinds else "<" if "<" in kinds else "="
                if bound in ("n/r", "n/a"):
                    mean = std = math.nan
                agg.append({"task": task, "optimizer": opt, "unit": unit, "seeds": len(bounds), "speedup": mean,
                            "std": std, "bound": bound})
    cols = ["task", "optimizer", "unit", "seeds", "speedup", "std", "bound"]
    return (sort_optimizers(pd.DataFrame(per_seed, columns=["task", "optimizer", "unit", "seed", "speedup", "bound"]),
                            ["task", "unit", "optimizer", "seed"]),
            sort_optimizers(pd.DataFrame(agg, columns=cols), ["task", "unit", "optimizer"]))


def _summary(d: pd.DataFrame) -> dict:
    final_mean, final_std, _ = stats(d["final"])
    t_mean, t_std, n_reached = stats(d.loc[d["reached"], "ttt_time"])
    e_mean, e_std, _ = stats(d.loc[d["reached"], "ttt_epoch"])
    l_mean, l_std, _ = stats(d.loc[d["reached_loose"], "ttt_time_loose"]) if "reached_loose" in d else (
        math.nan, math.nan, 0)
    return {"runs": len(d), "partial": int(d["partial"].sum()), "final": final_mean, "final_std": final_std,
            "reached": int(d["reached"].sum()), "ttt_time": t_mean, "ttt_time_std": t_std, "ttt_epoch": e_mean,
            "ttt_epoch_std": e_std, "reached_loose": int(d.get("reached_loose", pd.Series(dtype=bool)).sum()),
            "ttt_time_loose": l_mean, "ttt_time_loose_std": l_std}


def headline(runs: pd.DataFrame, speed: pd.DataFrame) -> pd.DataFrame:
    """Per task and optimizer (best configuration): final metric, time-to-target (mean over the
    seeds that reached it), and FNGD's speedup over that optimizer."""
    rows = []
    for (task, opt, config), d in runs[runs["best"]].groupby(["task", "optimizer", "config"]):
        row = {"task": task, "metric": d["metric"].iloc[0], "target": d["target"].iloc[0], "optimizer": opt,
               "config": config, **_summary(d)}
        for unit in ("time", "epochs"):
            s = speed[(speed["task"] == task) & (speed["optimizer"] == opt) & (speed["unit"] == unit)]
            none = {"speedup": math.nan, "std": math.nan, "bound": "ref" if opt == FNGD else "n/a"}
            s = s.iloc[0] if len(s) else none
            row.update({f"speedup_{unit}": s["speedup"], f"speedup_{unit}_std": s["std"],
                        f"speedup_{unit}_bound": s["bound"]})
        rows.append(row)
    return sort_optimizers(pd.DataFrame(rows), ["task", "optimizer"])


def final_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Final metric (mean, std over seeds, counts) of every configuration, with the record's other
    numeric final values (e.g. final_test_bleu) averaged."""
    extra = [c for c in runs.columns if c.startswith("final_") and c not in
             ("final_val_metric", "final_val_loss", "final_epochs", "final_time")
             and pd.to_numeric(runs[c], errors="coerce").notna().any()]
    rows = []
    for (task, opt, config), d in runs.groupby(["task", "optimizer", "config"]):
        s = _summary(d)
        row = {"task": task, "metric": d["metric"].iloc[0], "optimizer": opt, "config": config,
               "best": bool(d["best"].iloc[0]), "runs": s["runs"], "partial": s["partial"], "final": s["final"],
               "final_std": s["final_std"]}
        for c in extra:
            row[c], row[f"{c}_std"], _ = stats(d[c])
        rows.append(row)
    return sort_optimizers(pd.DataFrame(rows), ["task", "optimizer", "config"])


def epoch_cost(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Median epoch and step time of the best configurations by optimizer and phase, and relative to SGD."""
    d = df[df["source"].isin(runs.loc[runs["best"], "source"])].copy()
    d["phase"] = d["phase"].fillna("all")
    steps = d.groupby("source")["step"].diff()
    d["step_time"] = d["epoch_time"] / steps.fillna(d["step"])
    out = (d.groupby(["task", "optimizer", "phase"])
           .agg(epochs=("epoch", "size"), epoch_time=("epoch_time", "median"), step_time=("step_time", "median"))
           .reset_index())
    ref = d[d["optimizer"] == REFERENCE].groupby("task")[["epoch_time", "step_time"]].median()
    for col in ("epoch_time", "step_time"):
        out[f"{col}_vs_sgd"] = out[col] / out["task"].map(ref[col]) if len(ref) else math.nan
    return sort_optimizers(out, ["task", "optimizer", "phase"])


def ablation(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Every FNGD configuration: final metric, time-to-target, median collect/reuse epoch time."""
    f = df[df["optimizer"] == FNGD]
    cost = f.groupby(["task", "config", "phase"])["epoch_time"].median()
    rows = []
    for (task, config), d in runs[runs["optimizer"] == FNGD].groupby(["task", "config"]):
        row = {"task": task, "config": config, "best": bool(d["best"].iloc[0]), **_summary(d)}
        for phase in ("collect", "reuse"):
            row[f"{phase}_epoch_time"] = cost.get((task, config, phase), math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def reachable_targets(df: pd.DataFrame, runs: pd.DataFrame, default: dict[str, float]) -> pd.DataFrame:
    """Per task: the named targets of ``speedups_by_target`` (see the module docstring)."""
    rows = []
    best = df[df["source"].isin(runs.loc[runs["best"], "source"])]
    for task, d in best.groupby("task"):
        mode = d["mode"].iloc[0]
        curve = d.groupby(["optimizer", "epoch"])["val_metric"].mean()  # seed-mean of each best configuration
        peak = curve.groupby(level="optimizer").max() if mode == "max" else curve.groupby(level="optimizer").min()
        peak = peak.dropna()
        named = {"0.98 x best" if mode == "max" else "1.02 x best": default.get(task, math.nan)}
        if len(peak):
            worst = peak.idxmin() if mode == "max" else peak.idxmax()
            named[f"worst optimizer's best ({worst})"] = float(peak[worst])
        if BASELINE in peak.index:
            named[f"{BASELINE}'s best"] = float(peak[BASELINE])
        rows += [{"task": task, "target": name, "value": v} for name, v in named.items()]
    return pd.DataFrame(rows, columns=["task", "target", "value"])


def speedups_by_target(df: pd.DataFrame, named: pd.DataFrame) -> pd.DataFrame:
    """Every FNGD variant's speedup over every other optimizer at every named target."""
    rows = []
    for _, t in named.iterrows():
        runs = per_run(df[df["task"] == t["task"]], {t["task"]: t["value"]})
        reached = runs[runs["best"]].groupby("optimizer")["reached"].agg(["sum", "size"])
        for subject in sorted({o for o in runs["optimizer"] if is_fngd(o)}):
            _, agg = speedups(runs, subject)
            for _, a in agg.iterrows():
                rows.append({"task": t["task"], "target": t["target"], "value": t["value"], "fngd": subject,
                             "over": a["optimizer"], "unit": a["unit"], "seeds": a["seeds"],
                             "speedup": a["speedup"], "std": a["std"], "bound": a["bound"],
                             "fngd_reached": f"{reached.loc[subject, 'sum']}/{reached.loc[subject, 'size']}",
                             "over_reached": f"{reached.loc[a['optimizer'], 'sum']}/"
                                             f"{reached.loc[a['optimizer'], 'size']}"})
    return pd.DataFrame(rows, columns=["task", "target", "value", "fngd", "over", "unit", "seeds", "speedup", "std",
                                       "bound", "fngd_reached", "over_reached"])


def convergence(df: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Per task and optimizer (best configuration): did its seed-mean curve plateau by the last epoch?"""
    rows = []
    best = df[df["source"].isin(runs.loc[runs["best"], "source"])]
    for (task, opt), d in best.groupby(["task", "optimizer"]):
        curve = d.groupby("epoch")["val_metric"].mean().dropna()
        if curve.empty:
            continue
        last = int(curve.index.max())
        sign = 1.0 if d["mode"].iloc[0] == "max" else -1.0
        before = curve.get(last - PLATEAU_EPOCHS, math.nan)
        gain = sign * (curve[last] - before) / abs(before) if before else math.nan
        rows.append({"task": task, "optimizer": opt, "epochs": last, "at_last": float(curve[last]),
                     "before": float(before), "gain": gain, "peak": float(curve.max() if sign > 0 else curve.min()),
                     "plateaued": bool(gain < PLATEAU_GAIN) if not math.isnan(gain) else False})
    return sort_optimizers(pd.DataFrame(rows, columns=["task", "optimizer", "epochs", "at_last", "before", "gain",
                                                       "peak", "plateaued"]), ["task", "optimizer"])


def build_tables(df: pd.DataFrame, targets: dict[str, float] | None = None) -> dict[str, pd.DataFrame]:
    """All tables: targets, runs, headline, speedups, speedup_seeds, speedups_by_target, final,
    epoch_cost, ablation.
    ``targets`` (task -> value) override the default targets of those tasks."""
    targets = targets or {}
    chosen = {**default_targets(df[~df["task"].isin(list(targets))]), **targets}
    loose = default_targets(df, LOOSE_FACTOR)
    modes = df.groupby("task")["mode"].first()
    target_table = pd.DataFrame([{"task": t, "metric": df.loc[df["task"] == t, "metric"].iloc[0], "mode": modes[t],
                                  "target": v, "rule": "given" if t in targets else
                                  f"{DEFAULT_FACTOR[modes[t]]} x best seed-mean",
                                  "loose target": loose[t], "loose rule": f"{LOOSE_FACTOR[modes[t]]} x best seed-mean"}
                                 for t, v in chosen.items() if t in modes.index])
    runs = per_run(df, chosen, loose)
    seeds, speed = speedups(runs)
    named = reachable_targets(df, runs, chosen)
    return {"targets": target_table, "runs": runs, "headline": headline(runs, speed), "speedups": speed,
            "speedup_seeds": seeds, "speedups_by_target": speedups_by_target(df, named), "final": final_table(runs),
            "epoch_cost": epoch_cost(df, runs), "ablation": ablation(df, runs), "convergence": convergence(df, runs)}
