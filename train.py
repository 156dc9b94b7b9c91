"""Train a language model: ``python train.py [group=option ...] [key=value ...]``.

Examples::

    python train.py                                   # moe_tiny (the default) on the embedded Shakespeare corpus
    python train.py model=dense_124m data=hf data.hf.path=roneneldan/TinyStories trainer.device=cuda
    python train.py -m optim.lr=1e-3,3e-3 seed=0,1    # a sweep; one run folder per job under multirun/
    python train.py run_dir=runs/my_run               # re-running the same run_dir resumes it
    torchrun --nproc_per_node=2 train.py trainer.parallel=fsdp   # several processes (training/distributed/parallel.py)

Before Hydra runs anything (and so before it creates the run folder), ``training.cli.preflight``
checks the whole command line: keys, values and ranges, the device, the resume path, the model
(built on the meta device) and the data (the token shards are prepared and verified). A bad
command line gets one line naming the key, the value and what is allowed, and exit status 2.
"""

import sys

import hydra
from omegaconf import DictConfig

from training.cli import CONF_DIR, preflight, report_errors


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")  # absolute: also when imported
def main(cfg: DictConfig) -> float:
    from hydra.core.hydra_config import HydraConfig

    from training.trainer import train

    hydra_cfg = HydraConfig.get()
    with report_errors():
        if hydra_cfg.mode.name == "MULTIRUN":  # each sweep job trains in its own numbered folder
            cfg.run_dir = hydra_cfg.runtime.output_dir
        else:  # re-launching into a run folder continues the config saved there (training/run_config.py)
            from training.config import validate
            from training.run_config import continue_from_folder, describe

            continued = continue_from_folder(list(hydra_cfg.overrides.task), validate(cfg))
            if continued is not None:
                cfg, changes, path = continued
                print(describe(path, changes), flush=True)
        summary = train(cfg)
    return summary["final_val_loss"]  # the objective for sweeper plugins (e.g. Optuna)


def cli(argv: list[str]) -> None:
    """What ``python train.py ARGS`` does (tests call it in-process with a list of arguments)."""
    from training.distributed.env import env_world

    argv = list(argv)
    rank, _, world = env_world()
    if world > 1:
        from training.distributed.parallel import share_launch_stamp

        share_launch_stamp()  # before the config is composed: every rank must resolve the same run_dir
    preflight(argv)  # exits 2 on a bad command line; nothing has been written yet
    if world > 1 and rank > 0:  # only rank 0 writes the run folder's .hydra/ snapshot
        argv.append("hydra.output_subdir=null")
    sys.argv = [sys.argv[0], *argv]
    main()
    if world > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    cli(sys.argv[1:])
