"""Train a language model: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # moe_tiny (conf/config.yaml's default) on the embedded Shakespeare corpus
    python train.py model=dense_124m data=hf data.hf.path=roneneldan/TinyStories trainer.device=cuda
    python train.py -m optim.lr=1e-3,3e-3 seed=0,1    # a sweep; one run folder per job under multirun/
    python train.py run_dir=runs/my_run               # re-running the same run_dir resumes it
    torchrun --nproc_per_node=2 train.py trainer.parallel=fsdp   # several processes (training/distributed/parallel.py)

Before Hydra runs anything, the command-line keys are checked against the config so that a
typo is reported with the keys that are allowed there (see ``training.cli``).
"""
import sys

import hydra
from omegaconf import DictConfig

from training.cli import check_overrides, report_errors


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from training.trainer import train

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode.name == "MULTIRUN":  # each sweep job trains in its own numbered folder
        cfg.run_dir = hydra_cfg.runtime.output_dir
    with report_errors():
        summary = train(cfg)
    return summary["final_val_loss"]  # the objective for sweeper plugins (e.g. Optuna)


if __name__ == "__main__":
    from training.distributed.env import env_world

    check_overrides(sys.argv[1:])
    rank, _, world = env_world()
    if world > 1:
        from training.distributed.parallel import share_launch_stamp

        share_launch_stamp()  # every rank must resolve the same run_dir
        if rank > 0:  # only rank 0 writes the run folder's .hydra/ snapshot
            sys.argv.append("hydra.output_subdir=null")
    main()
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
