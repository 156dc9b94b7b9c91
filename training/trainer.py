"""The training loop: data → model → AdamW, with eval, logging, checkpoints and exact resume.

``train(cfg)`` is what ``train.py`` calls after Hydra composes the config. A resumed run
reproduces the losses of an uninterrupted one bit-for-bit on CPU: batches depend only on
(seed, step, micro-step), the schedule only on the step, and every RNG state is checkpointed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from arch.layers import FULL_MODEL, ElasticSetting
from training.accounting.account import account, format_accounting
from training.accounting.throughput import Throughput
from training.build import build_model, check_model_builds, resolve_device, seed_everything
from training.checkpoint import files as ckpt
from training.config import elastic_dims, validate
from training.config_schema import RootConfig
from training.data.run_copy import save_run_data
from training.distributed import parallel as dist_utils
from training.elastic import describe as describe_elastic
from training.elastic import sample_setting as sample_elastic
from training.errors import NonFiniteLossError, NonFiniteOutputError
from training.eval.loss import evaluate_loss
from training.metrics import MetricsLogger, NullLogger, plot_losses
from training.optim import build_optimizer, lr_at, set_lr, warmup_warning
from training.provenance import CONSOLE_LOG, ConsoleLog, record_launch


class Trainer:
    """Owns the model, optimizer, data sampler and run folder for one training run.

    ``callbacks`` are called as ``cb(trainer, event, step)`` with event in
    {"step_end", "checkpoint", "eval"}; tests use them to interrupt a run at a precise point.
    ``console`` (a ``training.provenance.ConsoleLog``) starts copying the console into the run
    folder's ``train.log`` once the folder exists.
    """

    def __init__(self, cfg: Any, callbacks: tuple[Callable, ...] = (), console: ConsoleLog | None = None):
        from training.data.shards import check_seq_len, prepare_data
        from training.data.windows import WindowSampler

        self.root = cfg if isinstance(cfg, RootConfig) else validate(cfg)  # fails before any work
        root, t = self.root, self.root.trainer
        self.callbacks = callbacks
        self.run_dir = Path(root.run_dir)
        if t.threads:
            torch.set_num_threads(t.threads)
        check_model_builds(root)  # block options only a constructor can judge: fail before anything is written
        device = resolve_device(t.device)
        self.parallel = dist_utils.setup_parallel(t, device)  # one process: Parallel() and nothing happens
        self.device = dist_utils.device_for(self.parallel, device)
        self._check_parallel()
        if t.resume not in ("auto", "none", "restart") and not Path(t.resume).exists():  # before anything is written
            raise ckpt.CheckpointError(
                f"trainer.resume={t.resume}: no such checkpoint (give a step_XXXXXXXX.pt file or "
                "folder, or auto / none / restart)"
            )
        self.is_main = self.parallel.is_main
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.is_main:  # each launch appends its overrides, git commit and time; train.log gets the console
            for stale in ckpt.sweep_stale(self.run_dir):  # temp files and unfinished folders of killed saves
                tqdm.write(f"removed {stale} (left by an interrupted save)")
            record_launch(self.run_dir, self.parallel.world)
            if console is not None:
                console.attach(self.run_dir / CONSOLE_LOG)
        self.autocast_dtype = (
            torch.bfloat16
            if (t.precision == "bf16" or (t.precision == "auto" and self.device.type == "cuda"))
            else None
        )

        self.data = prepare_data(root.data, progress=t.progress and self.is_main)
        if self.is_main:  # the folder alone can then be sampled, evaluated and exported (training/data/run_copy.py)
            save_run_data(self.run_dir, self.data)
        check_seq_len(self.data, root.data.seq_len)
        seed_everything(root.seed)  # the same on every rank: identical initial weights everywhere
        self.model = build_model(root, self.data.tokenizer.vocab_size).to(self.device)
        self.accounting = account(self.model, root.data.seq_len)  # before sharding: the whole model
        dist_utils.shard_experts(self.model, self.parallel)
        find_unused = root.elastic.enabled or root.model.depth["name"] != "plain"
        self.train_model = dist_utils.wrap_model(self.model, t.parallel, self.parallel, self.device, find_unused)
        self.config_dict = asdict(root)
        if self.is_main:
            _write_config(self.run_dir / "config.yaml", self.config_dict)
        self.optimizer = build_optimizer(self.model, root.optim, self.device.type)
        # Every rank draws the same global batch and keeps its own rows of it (disjoint slices).
        self.sampler = WindowSampler(
            self.data.train,
            self.data.train_mask,
            root.data.seq_len,
            t.batch_size,
            root.seed,
            align=self.data.window_align,
            rank=self.parallel.rank,
            world=self.parallel.world,
        )
        self.step, self.nonfinite_skipped, self.last_checkpoint = 0, 0, None
        self.sharded_checkpoints = t.checkpoint_format == "dcp" or (
            t.checkpoint_format == "auto" and self.parallel.enabled
        )
        self.dcp_writer = None

        resume_from = self._resume()
        self.logger = (
            MetricsLogger(self.run_dir, root.logger, self.config_dict, resume_from) if self.is_main else NullLogger()
        )
        if t.compile:
            self.train_model = torch.compile(self.train_model)
        self.throughput = Throughput(
            self.model, root, self.accounting.train_flops_per_token, self.device, self.parallel.world
        )

    def _check_parallel(self) -> None:
        t, world = self.root.trainer, self.parallel.world
        if t.batch_size % world:
            raise ValueError(
                f"trainer.batch_size={t.batch_size} is the global batch and must be divisible by the "
                f"{world} processes (each rank takes batch_size/{world} rows)"
            )
        sharded_model = t.parallel == "fsdp" or self.parallel.ep > 1
        if self.parallel.enabled and sharded_model and t.checkpoint_format == "torch":
            raise ValueError(
                "trainer.checkpoint_format=torch writes one file from rank 0 and cannot hold a sharded "
                "model (trainer.parallel=fsdp or expert_parallel>1); use checkpoint_format=auto or dcp"
            )

    # ----------------------------------------------------------------- resume / checkpoints
    def _resume(self) -> int | None:
        """Load the checkpoint named by ``trainer.resume``; return its step, or None for a fresh run."""
        from training.checkpoint.sharded import load_model_and_optimizer

        if self.root.trainer.resume == "restart" and self.is_main:
            moved = ckpt.discard_all(self.run_dir)
            if moved is not None:
                tqdm.write(f"trainer.resume=restart: moved the existing checkpoints to {moved}; starting from step 0")
        self.parallel.barrier()
        found = ckpt.checkpoint_to_resume(self.run_dir, self.root.trainer.resume, self.config_dict["model"])
        if found is None:
            return None
        path, state = found
        load_model_and_optimizer(state, self.model, self.optimizer, self.parallel)
        self.sampler.load_state_dict(state["sampler"])
        ckpt.set_rng_state(state["rng"])
        self.step = state["step"]
        self.nonfinite_skipped = state.get("nonfinite_skipped", 0)
        self.last_checkpoint = path
        if self.is_main:
            tqdm.write(f"resumed from {path} at step {self.step}")
        return self.step

    def save(self) -> Path:
        t = self.root.trainer
        state = {
            "schedule": {"name": self.root.schedule.name, "step": self.step},
            "sampler": self.sampler.state_dict(),
            "rng": ckpt.rng_state(),  # the same on every rank (same seed, same draws)
            "nonfinite_skipped": self.nonfinite_skipped,
            "config": self.config_dict,
        }
        if self.sharded_checkpoints:
            from training.checkpoint.sharded import DCPWriter

            if self.dcp_writer is None:
                self.dcp_writer = DCPWriter(self.parallel, t.checkpoint_async)
            path = ckpt.checkpoint_dir(self.run_dir) / f"step_{self.step:08d}"
            extra = {"format_version": ckpt.FORMAT_VERSION, "step": self.step, **state}
            self.dcp_writer.save(path, self.model, self.optimizer, extra, self._checkpoint_durable)
        else:
            state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **state}
            if self.is_main:
                self.last_checkpoint = ckpt.save_checkpoint(self.run_dir, self.step, state, t.keep_last)
            self.parallel.barrier()
        self._emit("checkpoint")
        return self.last_checkpoint

    def _checkpoint_durable(self, path: Path) -> None:
        """A sharded checkpoint is fully on disk: point ``latest`` at it and prune old ones (rank 0)."""
        if self.is_main:
            ckpt.point_latest_and_prune(self.run_dir, path, self.root.trainer.keep_last)
        self.last_checkpoint = path

    def _emit(self, event: str) -> None:
        for callback in self.callbacks:
            callback(self, event, self.step)

    # ----------------------------------------------------------------- training
    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def train_step(self) -> dict[str, Any] | None:
        """One optimizer step (with gradient accumulation). Returns the step's metrics, or None if skipped."""
        t = self.root.trainer
        lr = lr_at(self.step, self.root.optim.lr, t.max_steps, self.root.schedule)
        set_lr(self.optimizer, lr)
        lm_loss_sum = torch.zeros((), device=self.device)
        aux_sums: dict[str, torch.Tensor] = {}
        sub_model = self._elastic_setting()
        also_full = sub_model is not FULL_MODEL and self.root.elastic.mode == "full_plus_sub"
        if self.root.elastic.enabled:  # what this step trains costs: the sub-network (+ the full model)
            self.throughput.count_trained(sub_model, also_full)
        # Block diagnostics (router loads, entropy …) only on steps that are logged: on the others
        # the model does not even compute them. Everything stays on the device until fit() logs.
        collect = self._logs_step(self.step + 1)
        for micro in range(t.grad_accum):
            x_BT, y_BT = self.sampler.get_batch(self.step, micro)
            x_BT, y_BT = x_BT.to(self.device, non_blocking=True), y_BT.to(self.device, non_blocking=True)
            if also_full:  # the full model and the sampled sub-model share one backward
                self.model.set_elastic(FULL_MODEL)
                with self._autocast():
                    full = self.train_model(x_BT, y_BT, collect_metrics=collect)
                (full.loss / t.grad_accum).backward()
            self.model.set_elastic(sub_model)
            with self._autocast():
                out = self.train_model(x_BT, y_BT, collect_metrics=collect)
            (out.loss / t.grad_accum).backward()
            reported = full if also_full else out
            lm_loss_sum += reported.lm_loss.detach()
            for name, value in {**reported.aux_losses, **reported.metrics}.items():
                aux_sums[name] = aux_sums.get(name, 0.0) + value.detach().float() / t.grad_accum
        self.model.set_elastic(FULL_MODEL)
        dist_utils.sync_expert_grads(self.parallel)
        # Reported numbers are means over ranks (each rank saw its own rows of the global batch).
        reduced = self.parallel.all_reduce_mean({"loss": lm_loss_sum / t.grad_accum, **aux_sums})
        loss, aux_sums = reduced.pop("loss"), reduced
        if self.root.elastic.enabled:
            aux_sums.update(describe_elastic(sub_model, *elastic_dims(self.root.model)))
        clip = self.root.optim.grad_clip if self.root.optim.grad_clip > 0 else float("inf")
        grad_norm = dist_utils.clip_grad_norm(self.model, clip, self.parallel)
        # The one host read of a training step (trainer.nonfinite must know before optimizer.step).
        if not bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return self._nonfinite(loss, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.model.after_optimizer_step(self.step)
        self.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, **aux_sums}

    def _logs_step(self, step: int) -> bool:
        """Whether fit() logs the train metrics after optimizer step ``step`` (1-based count)."""
        t = self.root.trainer
        return step % t.log_every == 0 or step == t.max_steps

    def _elastic_setting(self) -> ElasticSetting:
        """This step's sub-network under elastic training (same on every rank: seeded by step)."""
        if not self.root.elastic.enabled:
            return FULL_MODEL
        return sample_elastic(self.root.elastic, self.step, self.root.seed, *elastic_dims(self.root.model))

    def _nonfinite(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        what = f"loss={loss.item()} grad_norm={grad_norm.item()} at step {self.step}"
        if self.root.trainer.nonfinite == "abort":
            self._wait_for_checkpoint()
            raise NonFiniteLossError(
                f"non-finite {what}; last good checkpoint: {self.last_checkpoint or 'none written yet'}"
            )
        self.nonfinite_skipped += 1
        self.step += 1  # the schedule and the batch stream move on, as if the step had happened
        if self.is_main:
            tqdm.write(f"skipped step with non-finite {what} ({self.nonfinite_skipped} skipped so far)")
        return None

    def evaluate(self) -> dict[str, float]:
        """Validation loss. DDP replicas split the batches; sharded models (FSDP, expert parallel) need
        every rank in every forward, so there each rank evaluates all batches."""
        t, p = self.root.trainer, self.parallel
        split = (p.rank, p.world, p.all_reduce_sum) if p.enabled and t.parallel == "ddp" and p.ep == 1 else None
        return evaluate_loss(
            self.model,
            self.data,
            self.root.data.seq_len,
            t.batch_size,
            t.eval_batches,
            self.device,
            self.autocast_dtype,
            split,
        )

    def _log_eval(self) -> dict[str, float]:
        result = self.evaluate()
        self.logger.log({"step": self.step, **result})
        self._emit("eval")
        return result

    def fit(self) -> dict[str, Any]:
        """Train to ``trainer.max_steps``; returns the run summary (also printed)."""
        t = self.root.trainer
        self._print_header()
        if self.step == 0:
            self.logger.log({"step": 0, **{f"acct/{k}": v for k, v in self.accounting.to_dict().items()}})
        first_eval = self._log_eval() if self.step == 0 else None
        last_eval = first_eval
        bar = tqdm(
            total=t.max_steps,
            initial=self.step,
            disable=not (t.progress and self.is_main),
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        while self.step < t.max_steps:
            metrics = self.throughput.time_step(self.train_step)  # throughput counts train steps only
            bar.update(1)
            if metrics is None:  # a skipped non-finite step: logged, and its eval and checkpoint still happen
                self.logger.log({"step": self.step, "nonfinite_skipped": self.nonfinite_skipped})
            if metrics is not None and self._logs_step(self.step):
                row = self.throughput.row(metrics, self.nonfinite_skipped)
                self.logger.log({"step": self.step, **row})
                bar.set_postfix(loss=f"{metrics['loss'].item():.3f}", tok_s=f"{row['tokens_per_s']:,.0f}")
            if self.step % t.eval_every == 0 or self.step == t.max_steps:
                last_eval = self._log_eval()
                if self.is_main:
                    bar.write(f"step {self.step}: val_loss {last_eval['val_loss']:.4f}  bpb {last_eval['val_bpb']:.3f}")
            if self.step % t.checkpoint_every == 0 or self.step == t.max_steps:
                self.save()
            self._emit("step_end")
        bar.close()
        if last_eval is None:  # resumed at max_steps: the run had finished; its final eval row is already logged
            last_eval = self.evaluate()
        self._wait_for_checkpoint()
        return self._finish(first_eval, last_eval, self.throughput.tokens_per_s)

    def _wait_for_checkpoint(self) -> None:
        if self.dcp_writer is not None:
            self.dcp_writer.wait()

    def _print_header(self) -> None:
        if not self.is_main:
            return
        n_params = self.model.num_parameters()
        p = self.parallel
        layout = f", {p.world} processes ({self.root.trainer.parallel}, expert_parallel={p.ep})" if p.enabled else ""
        tqdm.write(
            f"run folder: {self.run_dir}\n"
            f"data: {self.data.description}\n"
            f"model: {self.root.model.name} — {n_params / 1e6:.2f}M parameters "
            f"({self.model.num_parameters(exclude_embeddings=True) / 1e6:.2f}M without embeddings), "
            f"{self.throughput.flops_per_token / 1e6:.1f} MFLOP/token (train)\n"
            f"device: {self.device}{layout}, precision: {'bf16 autocast' if self.autocast_dtype else 'fp32'}, "
            f"{self.throughput.tokens_per_step} tokens/step, steps {self.step} → {self.root.trainer.max_steps}"
        )
        tqdm.write(format_accounting(self.accounting))
        warning = warmup_warning(self.root.schedule, self.root.trainer.max_steps)
        if warning:
            tqdm.write(warning)

    def _finish(self, first_eval, last_eval, tokens_per_s) -> dict[str, Any]:
        t = self.root.trainer
        if t.export_safetensors:
            full_state = dist_utils.full_model_state(self.model, self.parallel)  # collective when sharded
            if self.is_main:
                ckpt.export_safetensors(full_state, self.run_dir / "model.safetensors")
        if self.is_main:
            plot_losses(self.run_dir)
        sample = self.write_sample()  # every rank generates (sharded forwards); rank 0 writes
        self.logger.close()
        summary = {
            "run_dir": str(self.run_dir),
            "initial_val_loss": first_eval["val_loss"] if first_eval else None,
            "final_val_loss": last_eval["val_loss"],
            "final_val_bpb": last_eval["val_bpb"],
            "tokens_per_s": tokens_per_s,
            "nonfinite_skipped": self.nonfinite_skipped,
            "checkpoint": str(self.last_checkpoint),
        }
        if not self.is_main:
            return summary
        start = f"{first_eval['val_loss']:.4f} → " if first_eval else ""
        tqdm.write(
            f"\n── sample ──\n{sample}\n────────────\n"
            f"run folder:     {self.run_dir}\n"
            f"val loss:       {start}{last_eval['val_loss']:.4f} nats/token (bits per byte "
            f"{last_eval['val_bpb']:.3f})\n"
            f"throughput:     {tokens_per_s:,.0f} tokens/s\n"
            f"checkpoint:     {self.last_checkpoint}\n"
            f"resume/extend:  python train.py run_dir={self.run_dir} trainer.max_steps={2 * t.max_steps}\n"
            f'sample again:   python -m training.eval.sample {self.run_dir} --prompt "{t.sample_prompt}"'
        )
        return summary

    def write_sample(self) -> str:
        from training.eval.sample import generate_text

        t = self.root.trainer
        if t.sample_tokens == 0:
            return ""
        prompt = t.sample_prompt
        if self.root.data.source == "synthetic":  # a task prompt: the start of the first validation example
            prompt = self.data.tokenizer.decode(self.data.val[: self.root.data.seq_len // 2].tolist())
        try:
            text = generate_text(
                self.model,
                self.data.tokenizer,
                prompt,
                t.sample_tokens,
                t.sample_temperature,
                t.sample_top_k,
                seed=self.root.seed,
            )
        except NonFiniteOutputError as e:
            if self.is_main:
                tqdm.write(f"sample skipped: {e}")
            return f"(no sample: {e})"
        if self.is_main:
            ckpt.replace_link(self.run_dir / "sample.txt")
            (self.run_dir / "sample.txt").write_text(text + "\n")
        return text


def _write_config(path: Path, config_dict: dict) -> None:
    from omegaconf import OmegaConf

    ckpt.replace_link(path)
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(config_dict)))


def train(cfg: Any, callbacks: tuple[Callable, ...] = ()) -> dict[str, Any]:
    """Validate ``cfg``, build everything and train. The entry point of ``train.py``."""
    with ConsoleLog() as console:
        return Trainer(cfg, callbacks, console).fit()
