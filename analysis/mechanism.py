"""What FNGD's collect steps did, from the per-solve traces that ``FNGD(trace=...)`` writes
(``fairseq-train --fngd-trace``; fngd_plugin/diagnostics.py defines every column).

    python -m fngd_analysis.mechanism RUNS_DIR [RUNS_DIR ...] --out DIR

For every run directory holding a ``trace.jsonl`` (and the ``record.json`` the runners write): a
table of medians over each third of the collect epoch (DIR/mechanism.md), the per-step curves
(DIR/mechanism.png: cosine of the direction with the mean gradient, decrease of the batch loss
relative to SGD's, lambda_max(K) over the damping shift, the sentences whose loss rises), and how
the direction's squared norm splits over module kinds (embedding table, attention, feed-forward,
norms), named from the modules' qualified names.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

KINDS = (("embedding", ("embed", "output_projection")), ("attention", ("attn",)),
         ("feed-forward", ("fc1", "fc2", "ffn", "mlp")), ("norm", ("norm",)))


def kind_of(name: str) -> str:
    """A module kind from a qualified name ("Linear 'decoder.layers.0.fc1'" -> feed-forward); a
    tied block ("Embedding '...'+Linear '...'") is the embedding table."""
    low = name.lower()
    for kind, keys in KINDS:
        if any(k in low for k in keys):
            return kind
    return "other"


def load_traces(dirs: list[Path]) -> pd.DataFrame:
    """One row per solve of every run found under ``dirs``, with the run's label and final metrics."""
    rows = []
    for d in dirs:
        for trace in sorted(Path(d).rglob("trace.jsonl")):
            run = trace.parent
            record = json.loads((run / "record.json").read_text()) if (run / "record.json").exists() else {}
            hp = record.get("hparams") or {}
            label = " ".join(str(x) for x in (
                record.get("task", "?"), record.get("optimizer", "?"), hp.get("fngd_update", ""),
                hp.get("damping_mode", "relative") if "damping" in hp else "", hp.get("damping", ""),
                f"s{record['seed']}" if "seed" in record else "") if x != "") or run.name
            final = record.get("final") or {}
            for i, text in enumerate(trace.read_text().splitlines()):
                line = json.loads(text)
                row = {k: v for k, v in line.items() if not isinstance(v, dict)}
                for kind in (k for k, _ in KINDS):
                    row[f"norm_{kind}"] = 0.0
                row["norm_other"] = 0.0
                for name, share in (line.get("norm_share") or {}).items():
                    row[f"norm_{kind_of(name)}"] += share
                for r, cos in (line.get("cosine_at_relative") or {}).items():
                    row[f"cosine_at_{r}"] = cos
                row.update(run=label, task=record.get("task", "?"), solve=i, val_loss=final.get("val_loss"),
                           val_bleu=final.get("val_metric"))
                rows.append(row)
    return pd.DataFrame(rows)


COLUMNS = ["n", "damping", "cosine", "decrease", "ascent", "negative_coefficients", "ess", "top_share",
           "ones_on_top", "top_over_shift", "norm_embedding", "norm_attention", "norm_feed-forward", "norm_norm"]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Medians of COLUMNS per run and third of its collect epoch."""
    df = df.copy()
    df["third"] = df.groupby("run")["solve"].transform(lambda s: (3 * s // (s.max() + 1)).astype(int) + 1)
    cols = [c for c in COLUMNS if c in df]
    out = df.groupby(["run", "third"])[cols].median()
    return out


def plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("cosine", "cos(direction, mean gradient)"), ("decrease", "first-order decrease / SGD's"),
              ("top_over_shift", "lambda_max(K) / damping shift"), ("ascent", "share of sentences ascending")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0))
    for ax, (col, title) in zip(axes, panels):
        for run, g in df.groupby("run"):
            smooth = g[col].rolling(9, min_periods=1, center=True).median()
            ax.plot(g["solve"] / max(g["solve"].max(), 1), smooth, label=run, lw=1.2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("fraction of the collect epoch", fontsize=8)
        if col == "top_over_shift":
            ax.set_yscale("log")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="lower center", ncol=min(len(labels), 4))
    fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // 4), 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fngd_analysis.mechanism", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dirs", nargs="+", type=Path, help="directories searched for run folders with trace.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    df = load_traces(args.dirs)
    if df.empty:
        ap.error(f"no trace.jsonl under {', '.join(map(str, args.dirs))} (runs need --fngd-trace / trace=...)")
    args.out.mkdir(parents=True, exist_ok=True)
    table = summary(df)
    finals = df.groupby("run")[["val_loss", "val_bleu"]].first()
    text = ["# FNGD collect-epoch traces", "",
            "Medians over each third of the collect epoch (fngd_plugin/diagnostics.py defines the columns; "
            "norm_*: share of |d|^2 by module kind).", "",
            table.round(4).to_markdown(), "", "Final validation loss / BLEU of each run:", "",
            finals.to_markdown(), ""]
    (args.out / "mechanism.md").write_text("\n".join(text))
    plot(df, args.out / "mechanism.png")
    print(f"wrote {args.out / 'mechanism.md'} and {args.out / 'mechanism.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
