"""Training: config schema, data, trainer, checkpoints, evaluation, distributed setup, accounting."""


def _register_resolvers() -> None:
    """``${launch_stamp:}``: the launch time, identical on every rank of a multi-process job.

    ``train.py`` has rank 0 share its clock (training.distributed.parallel.share_launch_stamp) before Hydra
    composes the config; a process that did not (a test, a notebook) stamps its own clock once.
    """
    try:
        from omegaconf import OmegaConf
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        return
    if OmegaConf.has_resolver("launch_stamp"):
        return

    def launch_stamp() -> str:
        import os
        import time

        from training.distributed.env import LAUNCH_STAMP_ENV, STAMP_FORMAT

        return os.environ.setdefault(LAUNCH_STAMP_ENV, time.strftime(STAMP_FORMAT))

    OmegaConf.register_new_resolver("launch_stamp", launch_stamp)


_register_resolvers()
