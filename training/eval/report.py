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
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, median, stdev
from typing import Any

import yaml

NEVER_GROUP = ("seed", "run_dir", "hydra")  # a key equal to one of these, or under it, never groups
SKIP_DIRS = {"checkpoints", ".hydra", "wandb", "eval", "__pycache__"}
ACTIVE_PARAMS_KEY, TOTAL_PARAMS_KEY = "acct/active_params", "acct/total_params"


class ReportError(ValueError):
    """Bad input: no runs where runs were expected, an unknown --group-by key, …"""


@dataclass
class Run:
    """One run folder: its config (nested and flattened), command-line overrides and logged rows."""

    path: Path
    config: dict
    overrides: dict[str, str] | None
    train_rows: list[dict] = field(default_factory=list)
    eval_rows: list[dict] = field(default_factory=list)
    accounting: dict = field(default_factory=dict)  # acct/* keys (training.accounting.account, logged once at step 0)

    @property
    def flat(self) -> dict[str, Any]:
        return flatten(self.config)

    @property
    def max_steps(self) -> int | None:
        return self.config.get("trainer", {}).get("max_steps")

    @property
    def last_step(self) -> int:
        return max((r["step"] for r in self.train_rows + self.eval_rows), default=0)

    @property
    def incomplete_reason(self) -> str | None:
        """None for a finished run; otherwise why it cannot be counted."""
        if not self.train_rows and not self.eval_rows:
            return "no metrics rows (crashed before training started?)"
        if not self.eval_rows:
            return f"no eval rows (stopped at step {self.last_step})"
        target = self.max_steps or self.last_step
        if self.eval_rows[-1]["step"] < target:
            return f"last eval at step {self.eval_rows[-1]['step']} of {target} (crashed or still running)"
        return None

    @property
    def tokens_per_step(self) -> int:
        t, d = self.config.get("trainer", {}), self.config.get("data", {})
        return int(t.get("batch_size", 0)) * int(t.get("grad_accum", 1)) * int(d.get("seq_len", 0))

    def cumulative_flops(self, step: float) -> float:
        """Training FLOPs spent up to ``step``: each train row's flops_per_token covers the steps since the
        previous row."""
        total, previous, rate = 0.0, 0, 0.0
        for row in self.train_rows:
            rate = row.get("flops_per_token", 0.0) * self.tokens_per_step
            if row["step"] >= step:
                return total + rate * (step - previous)
            total += rate * (row["step"] - previous)
            previous = row["step"]
        return total + rate * (step - previous)  # past the last logged row: its rate continues

    def summary(self) -> dict[str, Any]:
        final = self.eval_rows[-1] if self.eval_rows else {}
        steps = final.get("step", self.last_step)
        speeds = [r["tokens_per_s"] for r in self.train_rows if "tokens_per_s" in r]
        active = self.accounting.get(ACTIVE_PARAMS_KEY)
        return {
            "run": str(self.path),
            "seed": self.config.get("seed"),
            "steps": steps,
            "final_val_loss": final.get("val_loss"),
            "final_val_bpb": final.get("val_bpb"),
            "tokens_seen": steps * self.tokens_per_step,
            "train_flops": self.cumulative_flops(steps),
            "active_params": active,
            "total_params": self.accounting.get(TOTAL_PARAMS_KEY),
            "tokens_per_s": median(speeds) if speeds else None,
            "incomplete": self.incomplete_reason or "",
        }


# ----------------------------------------------------------------------------- loading


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}; lists stay values."""
    if not isinstance(node, dict):
        return {prefix: node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def parse_overrides(lines: Iterable[str]) -> dict[str, str]:
    """Hydra override strings → {key: value}, with the ``+``/``++``/``~`` prefixes dropped."""
    parsed = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        parsed[key.lstrip("+~")] = value
    return parsed


def load_run(path: Path) -> Run:
    config_file = path / "config.yaml" if (path / "config.yaml").exists() else path / ".hydra" / "config.yaml"
    config = (yaml.safe_load(config_file.read_text()) or {}) if config_file.exists() else {}
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = parse_overrides(yaml.safe_load(overrides_file.read_text()) or []) if overrides_file.exists() else None
    by_step: dict[tuple[str, int], dict] = {}  # a resumed run re-logs steps: the last row wins
    accounting: dict = {}
    metrics = path / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
        accounting.update({k: v for k, v in row.items() if k.startswith("acct/")})  # its own row, or a train row
        kind = "eval" if "val_loss" in row else "train" if "loss" in row else None
        if kind and "step" in row:
            by_step[(kind, row["step"])] = row
    rows = sorted(by_step.items(), key=lambda item: item[0][1])
    return Run(
        path,
        config,
        overrides,
        [r for (k, _), r in rows if k == "train"],
        [r for (k, _), r in rows if k == "eval"],
        accounting,
    )


def is_run_folder(path: Path) -> bool:
    return (
        (path / "metrics.jsonl").exists()
        or (path / "config.yaml").exists()
        or (path / ".hydra" / "config.yaml").exists()
    )


def find_runs(paths: Iterable[str | Path]) -> list[Run]:
    """Every run folder at or below each path; ReportError names a path that holds none."""
    runs, seen = [], set()
    for given in paths:
        root = Path(given)
        if not root.exists():
            raise ReportError(f"{root}: no such file or directory")
        found = [root] if is_run_folder(root) else sorted(p for p in _walk(root) if is_run_folder(p))
        if not found:
            raise ReportError(
                f"no runs found under {root}: expected a run folder (holding metrics.jsonl and config.yaml) "
                "or a folder containing run folders (e.g. multirun/<date>/0, 1, …)"
            )
        for folder in found:
            if folder.resolve() not in seen:
                seen.add(folder.resolve())
                runs.append(load_run(folder))
    return runs


def _walk(root: Path) -> Iterable[Path]:
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_dir() and child.name not in SKIP_DIRS:
            yield child
            if not is_run_folder(child):  # runs do not nest
                yield from _walk(child)


# ----------------------------------------------------------------------------- grouping


def never_groups(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NEVER_GROUP)


def key_value(run: Run, key: str) -> str:
    """A run's value for a grouping key: its override if given, else the config's (``a/b`` → ``a.b.name``)."""
    if run.overrides and key in run.overrides:
        return run.overrides[key]
    flat = run.flat
    dotted = key.replace("/", ".")
    for candidate in (dotted, dotted + ".name"):
        if candidate in flat:
            return str(flat[candidate])
    return "(default)"


def grouping_keys(runs: list[Run]) -> list[str]:
    """The keys whose values differ between runs: overridden keys when every run recorded its overrides, else
    config keys."""
    if runs and all(r.overrides is not None for r in runs):
        candidates = list(dict.fromkeys(k for r in runs for k in r.overrides))
    else:
        candidates = list(dict.fromkeys(k for r in runs for k in r.flat))
    candidates = [k for k in candidates if not never_groups(k)]
    return [k for k in candidates if len({key_value(r, k) for r in runs}) > 1]


def group_runs(runs: list[Run], keys: list[str] | None = None) -> dict[str, list[Run]]:
    """{label: runs}; the label is ``k1=v1, k2=v2`` over the grouping keys (``all runs`` if none differ)."""
    keys = grouping_keys(runs) if keys is None else keys
    for key in keys:
        if never_groups(key):
            raise ReportError(
                f"--group-by {key!r}: seeds, run_dir and hydra keys are aggregated over, never grouped by"
            )
    groups: dict[str, list[Run]] = {}
    for run in runs:
        label = ", ".join(f"{k}={key_value(run, k)}" for k in keys) or "all runs"
        groups.setdefault(label, []).append(run)
    return dict(sorted(groups.items(), key=lambda item: _natural(item[0])))


def _natural(text: str) -> list:
    """Sort key in which 'top_k=10' follows 'top_k=2'."""
    import re

    return [
        (0, float(part), "") if re.fullmatch(r"-?\d+(\.\d+)?", part) else (1, 0.0, part)
        for part in re.split(r"([-\d.]+)", text)
        if part
    ]


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
