"""Turn run folders into a results table and plots.

    python -m training.eval.report <dirs…> [--out DIR] [--group-by k1,k2]


Each argument is a run folder (``metrics.jsonl`` + ``config.yaml``) or any folder above run folders
(a ``multirun/<date>`` sweep, ``runs/``); run folders are found recursively. Runs are grouped by
the keys that were overridden on the command line and differ between runs (from
``.hydra/overrides.yaml``; by diffing the configs where a run has none), or by ``--group-by``.
``seed``, ``run_dir`` and ``hydra.*`` never group: runs that differ only in seed are one group and
their numbers are aggregated (mean ± sample std, n shown).

Writes into ``--out`` (default: the first argument's folder):
  report.csv               one row per group: final val loss mean/std/min/max, tokens, FLOPs, …
  runs.csv                 one row per run
  report.md                the group table, plus the incomplete runs (crashed / still running)
  val_loss_vs_steps.png    mean val loss per group against step, shaded min..max over seeds
  val_loss_vs_flops.png    the same against cumulative training FLOPs

Training FLOPs are ``Σ flops_per_token × tokens`` over the logged train rows (each row covers the
steps since the previous one, so depth schemes whose FLOPs change during training are counted
as they changed). Activated parameters come from a logged ``acct/active_params`` when present.
Finding, loading and grouping the runs: :mod:`training.eval.run_folders`.
"""

from __future__ import annotations

import csv
import math
import sys
from collections.abc import Callable
from pathlib import Path
from statistics import mean, stdev
from typing import Any

from training.eval.run_folders import ReportError, Run, find_runs, group_runs, is_run_folder

# ----------------------------------------------------------------------------- statistics


def spread(values: list[float]) -> dict[str, float | int | None]:
    """n, mean, sample std (None for n < 2), min, max of the finite values."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {
        "n": len(values),
        "mean": mean(values),
        "std": stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
    }


def summarize_group(label: str, runs: list[Run]) -> dict[str, Any]:
    """One table row: finished runs aggregated over seeds; incomplete ones only counted."""
    done = [r.summary() for r in runs if r.incomplete_reason is None]
    loss = spread([s["final_val_loss"] for s in done])

    def avg(name: str):
        values = [s[name] for s in done if s[name] is not None]
        return mean(values) if values else None

    return {
        "group": label,
        "n": loss["n"],
        "n_incomplete": len(runs) - len(done),
        "seeds": " ".join(str(s["seed"]) for s in done),
        "final_val_loss_mean": loss["mean"],
        "final_val_loss_std": loss["std"],
        "final_val_loss_min": loss["min"],
        "final_val_loss_max": loss["max"],
        "final_val_bpb_mean": avg("final_val_bpb"),
        "steps": avg("steps"),
        "tokens_seen": avg("tokens_seen"),
        "train_flops": avg("train_flops"),
        "active_params": avg("active_params"),
        "total_params": avg("total_params"),
        "tokens_per_s": avg("tokens_per_s"),
    }


def curve(runs: list[Run], x_of: Callable[[Run, int], float]) -> list[tuple[float, float, float, float]]:
    """(x, mean, min, max) of val loss over the eval steps every finished run logged; x averaged over runs."""
    done = [r for r in runs if r.incomplete_reason is None] or runs
    per_run = [{row["step"]: row["val_loss"] for row in r.eval_rows} for r in done]
    common = sorted(set.intersection(*(set(d) for d in per_run))) if per_run else []
    points = []
    for step in common:
        losses = [d[step] for d in per_run]
        points.append((mean(x_of(r, step) for r in done), mean(losses), min(losses), max(losses)))
    return points


# ----------------------------------------------------------------------------- output


def fmt(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    if isinstance(value, float) and (abs(value) >= 1e5 or 0 < abs(value) < 1e-3):
        return f"{value:.3g}"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def loss_cell(row: dict) -> str:
    if row["final_val_loss_mean"] is None:
        return "—"
    std = row["final_val_loss_std"]
    return f"{row['final_val_loss_mean']:.4f} ± {std:.4f}" if std is not None else f"{row['final_val_loss_mean']:.4f}"


def markdown_table(rows: list[dict]) -> str:
    header = (
        "| group | n | final val loss (mean ± std) | val bpb | steps | tokens seen | train FLOPs | active "
        "params | tokens/s |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        n = f"{r['n']}" + (f" (+{r['n_incomplete']} incomplete)" if r["n_incomplete"] else "")
        lines.append(
            f"| {r['group']} | {n} | {loss_cell(r)} | {fmt(r['final_val_bpb_mean'], 3)} | "
            f"{fmt(r['steps'] and int(r['steps']))} "
            f"| {fmt(r['tokens_seen'] and int(r['tokens_seen']))} | {fmt(r['train_flops'])} "
            f"| {fmt(r['active_params'] and int(r['active_params']))} | "
            f"{fmt(r['tokens_per_s'] and round(r['tokens_per_s']))} |"
        )
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def plot_curves(
    groups: dict[str, list[Run]], path: Path, x_of: Callable[[Run, int], float], xlabel: str, title: str
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for label, runs in groups.items():
        points = curve(runs, x_of)
        if not points:
            continue
        xs, means, lows, highs = zip(*points)
        n = sum(r.incomplete_reason is None for r in runs)
        (line,) = ax.plot(xs, means, "o-", ms=3, lw=1.5, label=f"{label} (n={n})")
        ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("val loss (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(groups: dict[str, list[Run]], out: Path, title: str = "Run report") -> dict[str, Any]:
    """Write report.csv, runs.csv, report.md and both PNGs into ``out``; return the rows and paths."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [summarize_group(label, runs) for label, runs in groups.items()]
    all_runs = [r for runs in groups.values() for r in runs]
    write_csv(out / "report.csv", rows)
    write_csv(out / "runs.csv", [{"group": label, **r.summary()} for label, runs in groups.items() for r in runs])
    band = "mean over seeds, shaded min..max"
    plots = {
        "steps": plot_curves(groups, out / "val_loss_vs_steps.png", lambda r, s: s, "step", f"val loss ({band})"),
        "flops": plot_curves(
            groups,
            out / "val_loss_vs_flops.png",
            Run.cumulative_flops,
            "cumulative training FLOPs",
            f"val loss ({band})",
        ),
    }
    incomplete = [r for r in all_runs if r.incomplete_reason]
    md = [
        f"# {title}",
        "",
        markdown_table(rows),
        "",
        "Final val loss: mean ± sample std over the finished runs of each group (n). Tokens seen = steps × batch × "
        "grad_accum × seq_len; train FLOPs = Σ flops_per_token × tokens over the logged steps; tokens/s = median of "
        "the "
        "logged rows, averaged over runs.",
        "",
        "![val loss vs steps](val_loss_vs_steps.png)",
        "",
        "![val loss vs FLOPs](val_loss_vs_flops.png)",
        "",
    ]
    if incomplete:
        md += ["## Incomplete runs (not in the numbers above)", ""]
        md += [f"- `{r.path}`: {r.incomplete_reason}" for r in incomplete]
        md.append("")
    (out / "report.md").write_text("\n".join(md) + "\n")
    return {"rows": rows, "incomplete": incomplete, "plots": plots, "markdown": out / "report.md"}


def main(argv: list[str] | None = None) -> int:
    from training.tool_args import parse, tool_parser

    parser = tool_parser("python -m training.eval.report", __doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="+", help="run folders, multirun folders or any folder above run folders")
    parser.add_argument("--out", help="output folder (default: the first path's folder, or ./report for a single run)")
    parser.add_argument(
        "--group-by", help="comma-separated keys to group by (default: the overridden keys that differ)"
    )
    args = parse(parser, argv)
    try:
        runs = find_runs(args.paths)
        keys = [k.strip() for k in args.group_by.split(",") if k.strip()] if args.group_by else None
        groups = group_runs(runs, keys)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    first = Path(args.paths[0])
    out = Path(args.out) if args.out else (Path("report") if is_run_folder(first) else first)
    result = write_report(groups, out, title=f"Report: {', '.join(args.paths)}")
    print(markdown_table(result["rows"]))
    for run in result["incomplete"]:
        print(f"incomplete: {run.path}: {run.incomplete_reason}", file=sys.stderr)
    print(f"\nwrote {out / 'report.md'}, report.csv, runs.csv, val_loss_vs_steps.png, val_loss_vs_flops.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
