"""Evaluate a checkpoint over inference settings: ``python evaluate.py ckpt=<run folder or .pt>``.

``analysis=elastic`` (default) sweeps top-k' (the elastic curve, with the training k marked),
routable-expert subsets and depths: a printed table (setting, active params, forward FLOPs/token,
val loss, Δ vs the trained setting), ``elastic.csv`` with the same columns and ``elastic.png``
(loss against the setting and against active FLOPs). Looped depth schemes add ``depth.csv`` /
``depth.png`` (every iteration count or ITT ratio setting). ``analysis=routing`` writes per-layer
expert-load plots and co-activation matrices for every routed FFN (moe, emoe, mhmoe, moue).
``analysis=all`` does all of them. Outputs go to ``<run folder>/eval`` unless ``out_dir`` is given.
"""

import re
import sys

import hydra
from omegaconf import DictConfig

from training.cli import CONF_DIR, check_evaluate_arguments, report_errors

USAGE = (
    "usage: python evaluate.py ckpt=<run folder or checkpoint .pt> [analysis=elastic|routing|depth|all] [key=value ...]"
)


def help_text() -> str:
    """evaluate.py's own options, read from conf/evaluate.yaml: key=default and the comment after it."""
    options, section = [], None
    for line in (CONF_DIR / "evaluate.yaml").read_text().splitlines():
        match = re.match(r"^(\s*)([A-Za-z_]\w*):\s*([^#]*?)\s*(?:#\s*(.*))?$", line)
        if not match:
            continue
        indent, key, value, comment = match.groups()
        if not indent:
            section = key if not value else None
            if key in ("defaults", "hydra") or not value:
                continue
            options.append((key, value, comment or ""))
        elif section == "sweep":
            options.append((f"sweep.{key}", value, comment or ""))
    width = max(len(f"{k}={v}") for k, v, _ in options)
    lines = [
        USAGE,
        "",
        "Loads a trained run and prints a table per sweep (setting, active params, forward",
        "FLOPs/token, val loss, Δ vs the trained setting); writes the CSVs and plots to out_dir.",
        "",
        "options (key=default  meaning):",
    ]
    lines += [f"  {f'{k}={v}'.ljust(width)}  {c}" for k, v, c in options]
    lines += [
        "",
        "example: python evaluate.py ckpt=runs/moe analysis=all sweep.top_k=[1,2,4] eval_batches=50",
        "Hydra's own flags (--cfg job, --hydra-help) still work.",
    ]
    return "\n".join(lines)


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from training.eval.elastic_sweeps import run_evaluation

    with report_errors():
        run_evaluation(cfg)


if __name__ == "__main__":
    if any(a in ("-h", "--help") for a in sys.argv[1:]):  # before Hydra, whose --help shows no option meanings
        print(help_text())
        sys.exit(0)
    if any(a.startswith("ckpt=") for a in sys.argv[1:]) or any(a in ("--cfg", "--hydra-help") for a in sys.argv[1:]):
        check_evaluate_arguments(sys.argv[1:])  # exits 2 with one line before anything is loaded or written
        main()
    else:
        print(USAGE + "\n(python evaluate.py --help lists every option)", file=sys.stderr)
        sys.exit(2)
