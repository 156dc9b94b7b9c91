"""Evaluate a checkpoint over inference settings: ``python evaluate.py ckpt=<run folder or .pt>``.

``analysis=elastic`` (default) sweeps top-k' (the elastic curve, with the training k marked),
routable-expert subsets and depths, and writes ``elastic.csv`` + ``elastic.png``.
``analysis=routing`` writes a per-layer expert-load heatmap and an expert co-activation matrix
(``routing_load.png``, ``routing_coactivation.png``, ``routing.csv``). ``analysis=all`` does both.
Outputs go to ``<run folder>/eval`` unless ``out_dir`` is given.
"""
import sys

import hydra
from omegaconf import DictConfig

from training.cli import CONF_DIR, check_evaluate_arguments, report_errors


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from training.eval.elastic_sweeps import run_evaluation

    with report_errors():
        run_evaluation(cfg)


if __name__ == "__main__":
    if any(a.startswith("ckpt=") for a in sys.argv[1:]) or any(a in ("-h", "--help", "--cfg") for a in sys.argv[1:]):
        check_evaluate_arguments(sys.argv[1:])  # exits 2 with one line before anything is loaded or written
        main()
    else:
        print("usage: python evaluate.py ckpt=<run folder or checkpoint .pt> [analysis=elastic|routing|depth|all]", file=sys.stderr)
        sys.exit(2)
