"""Score our checkpoints with EleutherAI's lm-evaluation-harness.

    python -m training.eval.lm_eval_adapter --run RUN_DIR --tasks hellaswag,arc_easy [--include_path DIR]

Importing this module registers the model type ``sparse-arch`` with lm-eval, so from Python
``lm_eval.simple_evaluate(model="sparse-arch", model_args={"run": RUN_DIR}, tasks=[...])`` works.
The ``lm_eval`` command line does not discover models outside its own package; use the command
above, which takes the usual task options and calls ``lm_eval.simple_evaluate``.

Scoring follows lm-eval's conventions (``TemplateLM``): trailing context spaces move into the
continuation, an empty context is replaced by the end-of-text token, inputs longer than the
model's ``max_seq_len`` are truncated from the left, and rolling log-likelihoods use disjoint
windows of full context. Generation is greedy with the model's KV-cached ``generate``.

Legend: B batch, T tokens, V vocab.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

DEFAULT_MAX_GEN_TOKS = 256


@register_model("sparse-arch")
class SparseArchLM(TemplateLM):
    """lm-eval model for a run folder or checkpoint (``run=``), or an in-memory ``model`` + ``tokenizer``.

    ``batch_size`` sequences are scored per forward pass (generation runs one request at a time:
    the model has no padding mask, so prompts of different lengths cannot share a batch). An MoE
    with ``capacity_factor`` set drops tokens per batch, so its scores depend on ``batch_size``.
    """

    def __init__(
        self,
        run: str | None = None,
        batch_size: int | str = 8,
        device: str | None = "auto",
        model=None,
        tokenizer=None,
        max_batch_size: int | None = None,
    ):
        super().__init__()  # max_batch_size: lm-eval passes it to every model; unused (no batch-size search)
        if (run is None) == (model is None):
            raise ValueError(
                "sparse-arch needs exactly one of run=RUN_DIR_OR_CHECKPOINT or model=<LanguageModel> (+ tokenizer)"
            )
        if model is None:
            from training.eval.loss import load_trained

            model, data, _, _ = load_trained(run, _device_name(device))
            tokenizer = data.tokenizer
        if tokenizer is None:
            raise ValueError("sparse-arch with an in-memory model also needs its tokenizer")
        if tokenizer.eos_id is None:
            raise ValueError(
                f"{tokenizer!r} has no end-of-text token, which lm-eval needs as the prefix of empty contexts"
            )
        self.model, self.tokenizer = model.eval(), tokenizer
        self.batch_size = 8 if str(batch_size).startswith("auto") else int(batch_size)  # "auto" is not measured
        self.max_length = int(model.cfg.max_seq_len)
        self._device = next(model.parameters()).device

    # ---------------------------------------------------------------------- tokenizer
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)  # we train without BOS: nothing to add

    def tok_decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    # ---------------------------------------------------------------------- scoring
    def _score(self, context_enc: list[int], continuation_enc: list[int]) -> tuple[list[int], int]:
        """(model input, number of continuation tokens): the last max_length+1 tokens, minus the final one."""
        if not continuation_enc:
            raise ValueError("lm-eval asked to score an empty continuation")
        if len(continuation_enc) > self.max_length:
            raise ValueError(
                f"a continuation of {len(continuation_enc)} tokens exceeds the model's max_seq_len={self.max_length}"
            )
        whole = (context_enc + continuation_enc)[-(self.max_length + 1) :]
        return whole[:-1], len(continuation_enc)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Σ log p(continuation | context) and whether greedy decoding reproduces it, per request.

        ``requests``: ((context, continuation) or None, context ids, continuation ids). Longest
        first, so each batch is right-padded to its first member; padding sits after every real
        token, so causal attention keeps it from changing the scored positions.
        """
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            inputs = [self._score(requests[i][1], requests[i][2]) for i in chunk]
            T = max(len(ids) for ids, _ in inputs)
            idx_BT = torch.zeros(len(chunk), T, dtype=torch.long)
            for row, (ids, _) in enumerate(inputs):
                idx_BT[row, : len(ids)] = torch.tensor(ids)
            idx_BT = idx_BT.to(self._device)
            logprobs_BTV = F.log_softmax(self.model(idx_BT, idx_BT).logits.float(), dim=-1)
            for row, (i, (ids, n_cont)) in enumerate(zip(chunk, inputs)):
                cont_ids = torch.tensor(requests[i][2][-n_cont:], device=self._device)
                scored_TV = logprobs_BTV[row, len(ids) - n_cont : len(ids)]
                logprob = float(scored_TV.gather(-1, cont_ids[:, None]).sum())
                greedy = bool((scored_TV.argmax(-1) == cont_ids).all())
                results[i] = (logprob, greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p(every token of the text), in disjoint windows that each see up to max_length tokens."""
        windows, owners = [], []
        for r, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1),
            ):
                windows.append((None, context, continuation))
                owners.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[r] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ---------------------------------------------------------------------- generation
    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, when do_sample with temperature > 0) continuations cut at the first ``until`` string.

        Our ``generate`` has no stop-string hook, so it runs to ``max_gen_toks`` (or end-of-text)
        and the text is cut afterwards: the result is the same, only the compute is not saved.
        """
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.max_length - 1)
            temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.eot_token_id]
            out_BT = self.model.generate(
                torch.tensor([prompt], device=self._device), max_new, temperature=temperature, eos_id=self.eot_token_id
            )
            new_ids = out_BT[0, len(prompt) :].tolist()
            if self.eot_token_id in new_ids:
                new_ids = new_ids[: new_ids.index(self.eot_token_id)]
            text = self.tok_decode(new_ids)
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs


def _device_name(device: str | None) -> str:
    """lm-eval passes e.g. 'cuda:0'; ``load_trained`` takes auto / cpu / cuda / a torch device string."""
    return "auto" if device in (None, "") else str(device)


def evaluate(
    run: str, tasks: list[str], include_path: str | None = None, include_defaults: bool = True, **options
) -> dict:
    """lm_eval.simple_evaluate on our model; ``options`` go to simple_evaluate (num_fewshot, limit …).

    ``include_defaults=False`` skips indexing lm-eval's ~15k built-in task configs (seconds) when
    only ``include_path`` tasks are wanted.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    return lm_eval.simple_evaluate(
        model="sparse-arch", model_args={"run": run}, tasks=tasks, task_manager=task_manager, **options
    )


def main(argv: list[str] | None = None) -> int:
    from training.tool_args import parse, tool_parser

    parser = tool_parser("python -m training.eval.lm_eval_adapter", __doc__.split("\n\n")[0])
    parser.add_argument(
        "--run", required=True, help="a run folder (uses its newest checkpoint) or a checkpoint .pt file"
    )
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--include_path", default=None, help="a folder of extra task YAMLs")
    parser.add_argument(
        "--no_default_tasks", action="store_true", help="only the tasks under --include_path (faster start)"
    )
    parser.add_argument("--num_fewshot", type=int, default=None)
    parser.add_argument("--limit", type=float, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default=None, help="write the results dict here as JSON")
    args = parse(parser, argv)
    from lm_eval.utils import make_table

    results = evaluate(
        args.run,
        [t for t in args.tasks.split(",") if t],
        args.include_path,
        not args.no_default_tasks,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        device=args.device,
        log_samples=False,
    )
    print(make_table(results))
    if args.output:
        Path(args.output).write_text(
            json.dumps(
                {k: results[k] for k in ("results", "versions", "n-shot", "configs") if k in results},
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
