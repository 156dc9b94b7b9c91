"""Evaluation shared by the trainer, the sampler and ``evaluate.py``: val loss and checkpoint loading."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch


@torch.no_grad()
def evaluate_loss(
    model,
    data,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    device,
    autocast_dtype=None,
    split: tuple[int, int, Any] | None = None,
) -> dict[str, float]:
    """Mean next-token loss over deterministic val windows → val_loss, val_ppl, val_bpb.

    ``split=(rank, world, sum_over_ranks)``: this process scores batches rank, rank+world, …, and
    ``sum_over_ranks`` (a float64 tensor in, summed tensor out) combines the totals. Only for
    models whose forward has no collectives (DDP replicas); sharded ones evaluate every batch.
    """
    from training.data.windows import iter_eval_batches

    rank, world, sum_over_ranks = split or (0, 1, None)
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for index, (x_BT, y_BT) in enumerate(iter_eval_batches(data.val, data.val_mask, seq_len, batch_size, max_batches)):
        if index % world != rank:
            continue
        x_BT, y_BT = x_BT.to(device), y_BT.to(device)
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            out = model(x_BT, y_BT)
        n = int((y_BT != -100).sum())
        loss_sum += out.lm_loss.item() * n
        count += n
    model.train(was_training)
    if sum_over_ranks is not None:
        loss_sum, count = sum_over_ranks(torch.tensor([loss_sum, count], dtype=torch.float64, device=device)).tolist()
    val_loss = loss_sum / max(count, 1)
    return {
        "val_loss": val_loss,
        "val_ppl": math.exp(min(val_loss, 50.0)),
        "val_bpb": val_loss / math.log(2) / data.val_bytes_per_token,
    }


def load_trained(target: str | Path, device: str = "auto", with_train: bool = False) -> tuple[Any, Any, Any, Path]:
    """(model in eval mode, prepared data, validated config, checkpoint path) from a run folder or checkpoint.

    Reads through training/checkpoint/load.py, the one verified, code-free loader. The data comes from the
    run folder's own copy (tokenizer and validation tokens, ``training/data/run_copy.py``) when it has one, so
    a run folder is self-contained; runs without a copy prepare their data as in training. ``with_train``: the
    training split is needed too (conversions, merges and calibration sample training batches), so the data
    is prepared from its source as in training.
    """
    from training.build import build_model, resolve_device
    from training.checkpoint.load import load_model_weights, resolve_target
    from training.config import validate
    from training.data.run_copy import open_run_data
    from training.data.shards import prepare_data

    path, state = resolve_target(target)
    root = validate(state["config"])
    run_dir = Path(path).parent.parent if Path(path).parent.name == "checkpoints" else None
    data = open_run_data(run_dir) if run_dir is not None and not with_train else None
    if data is None:
        data = prepare_data(root.data, progress=False)
    model = build_model(root, data.tokenizer.vocab_size)
    load_model_weights(state, model)
    model.to(resolve_device(device)).eval()
    return model, data, root, path
