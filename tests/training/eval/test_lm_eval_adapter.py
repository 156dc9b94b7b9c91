"""lm-eval-harness adapter: scores equal log-probs computed from the model's logits; a local task runs offline."""

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402

from tests.helpers import tiny_config  # noqa: E402
from training.eval.lm_eval_adapter import SparseArchLM, main  # noqa: E402
from training.eval.loss import load_trained  # noqa: E402
from training.trainer import train  # noqa: E402


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("lm_eval") / "run"
    train(
        tiny_config(
            run, "trainer.max_steps=2", "trainer.eval_every=2", "trainer.checkpoint_every=2", "trainer.sample_tokens=0"
        )
    )
    return run


@pytest.fixture(scope="module")
def lm(run_dir):
    model, data, _, _ = load_trained(run_dir, device="cpu")
    return SparseArchLM(model=model, tokenizer=data.tokenizer, batch_size=2)


def request(kind: str, *args) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def logprob_of(lm, context_ids: list[int], continuation_ids: list[int]) -> float:
    """Σ log p(continuation | context) from one unbatched forward pass over the last max_length+1 tokens."""
    whole = (context_ids + continuation_ids)[-(lm.max_length + 1) :]
    idx_1T = torch.tensor([whole[:-1]])
    with torch.no_grad():
        logprobs_TV = F.log_softmax(lm.model(idx_1T, idx_1T).logits[0].float(), dim=-1)
    n = len(continuation_ids)
    return sum(float(logprobs_TV[len(whole) - 1 - n + j, token]) for j, token in enumerate(continuation_ids))


def test_sparse_arch_is_registered_with_lm_eval():
    assert get_model("sparse-arch") is SparseArchLM


def test_loglikelihood_equals_independent_sum_of_logprobs(lm):
    encode, eos = lm.tokenizer.encode, lm.eot_token_id
    long_context = "Now is the winter of our discontent made glorious summer " * 2  # > max_length bytes: truncated left
    pairs = [("ROMEO:", " Wherefore art thou"), ("JULIET: ", "ay me"), ("", "To be"), (long_context, " by this sun")]
    results = lm.loglikelihood([request("loglikelihood", c, x) for c, x in pairs])
    assert len(long_context) > lm.max_length
    for (context, continuation), (logprob, greedy) in zip(pairs, results):
        spaces = len(context) - len(
            context.rstrip()
        )  # lm-eval scores a context's trailing spaces with the continuation
        context, continuation = context[: len(context) - spaces], context[len(context) - spaces :] + continuation
        context_ids = encode(context) if context else [eos]  # bytes: encode(a + b) == encode(a) + encode(b)
        expected = logprob_of(lm, context_ids, encode(continuation))
        assert logprob == pytest.approx(expected, abs=1e-4)
        assert isinstance(greedy, bool) and logprob < 0


def test_loglikelihood_rolling_scores_every_token_once(lm):
    short, long = "To be, or not to be", "All the world's a stage, and all the men and women merely players."
    assert len(short) < lm.max_length < len(long)
    short_score, long_score = lm.loglikelihood_rolling(
        [request("loglikelihood_rolling", short), request("loglikelihood_rolling", long)]
    )
    assert short_score == pytest.approx(logprob_of(lm, [lm.eot_token_id], lm.tokenizer.encode(short)), abs=1e-4)
    # The first window predicts max_length tokens from eos; later ones each see a full window of context.
    ids, L = lm.tokenizer.encode(long), lm.max_length
    expected = logprob_of(lm, [lm.eot_token_id], ids[:L])
    for start in range(L, len(ids), L):
        expected += logprob_of(lm, ids[:start], ids[start : start + L])
    assert long_score == pytest.approx(expected, abs=1e-3)


def test_generate_until_is_greedy_and_honours_stop_strings_and_max_gen_toks(lm):
    prompt = "ROMEO:"
    ids = lm.tokenizer.encode(prompt)
    greedy = lm.model.generate(torch.tensor([ids]), 12, temperature=0, eos_id=lm.eot_token_id)[0, len(ids) :].tolist()
    full_text = lm.tokenizer.decode(greedy[: greedy.index(lm.eot_token_id)] if lm.eot_token_id in greedy else greedy)
    stop = full_text[4:6] if len(full_text) >= 6 else "\x00"
    unstopped, stopped = lm.generate_until(
        [
            request("generate_until", prompt, {"until": ["\x00never"], "max_gen_toks": 12}),
            request("generate_until", prompt, {"until": [stop], "max_gen_toks": 12}),
        ]
    )
    assert unstopped == full_text
    assert stopped == full_text.split(stop)[0] and len(stopped) <= 4


TASK_YAML = """\
task: sparse_arch_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""

EXAMPLES = [
    {"question": "ROMEO: O, she doth teach the torches to burn", "choices": [" bright!", " zzqx", " 123"], "answer": 0},
    {"question": "To be, or not to", "choices": [" be", " qqq", " ###"], "answer": 0},
    {"question": "JULIET: Wherefore art thou", "choices": [" Romeo?", " xkcd", " ..."], "answer": 0},
    {"question": "All the world's a", "choices": [" 9z9", " stage", " ~~~"], "answer": 1},
]


def run_local_task(run_dir, tmp_path) -> dict:
    """The adapter's CLI on a run folder with the local multiple-choice task above; returns results.json."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    data = tasks / "tiny_mc.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    (tasks / "tiny_mc.yaml").write_text(TASK_YAML.format(data=data, cache=tmp_path / "hf-datasets"))
    out = tmp_path / "results.json"
    argv = [
        "--run",
        str(run_dir),
        "--tasks",
        "sparse_arch_tiny_mc",
        "--include_path",
        str(tasks),
        "--no_default_tasks",
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--output",
        str(out),
    ]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_simple_evaluate_runs_a_local_multiple_choice_task_offline(run_dir, tmp_path, capsys):
    metrics = run_local_task(run_dir, tmp_path)["results"]["sparse_arch_tiny_mc"]
    assert 0.0 <= metrics["acc,none"] <= 1.0
    assert "sparse_arch_tiny_mc" in capsys.readouterr().out  # the results table
