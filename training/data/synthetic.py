"""Synthetic algorithmic tasks with scored answers only.

assoc_recall: "k3 v7 k1 v2 ... ? k1 -> v2 ."  (n_keys distinct keys, each with a value; recall one)
mod_add:      "12 + 90 = 5 ."                  (a + b mod modulus)

Examples of fixed length are packed into blocks of exactly seq_len tokens (padded with <pad>), so a
window starting at a multiple of seq_len holds whole examples. The mask is 1 at the token *before*
each answer (the position whose next-token target is the answer) and 0 everywhere else.
"""

from __future__ import annotations

import numpy as np

from training.data.tokenizer import FixedVocabTokenizer, _cfg_get

TASKS = ("assoc_recall", "mod_add")
PAD, EOS = "<pad>", "."


def task_params(syn_cfg) -> dict:
    """The parameters that determine the generated data (used in cache keys and by the tokenizer)."""
    task = _cfg_get(syn_cfg, "task", "assoc_recall")
    if task not in TASKS:
        raise ValueError(f"unknown data.synthetic.task={task!r}; expected one of {', '.join(TASKS)}")
    params = {
        "task": task,
        "num_train": int(_cfg_get(syn_cfg, "num_train", 20000)),
        "num_val": int(_cfg_get(syn_cfg, "num_val", 1000)),
        "seed": int(_cfg_get(syn_cfg, "seed", 0)),
    }
    if task == "assoc_recall":
        n_keys = int(_cfg_get(syn_cfg, "n_keys", 16))
        params["n_keys"] = n_keys
        # Twice as many key/value symbols as pairs, so the keys of one example are a random subset.
        params["num_symbols"] = int(_cfg_get(syn_cfg, "num_symbols", 2 * n_keys))
        if n_keys < 1 or params["num_symbols"] < n_keys:
            raise ValueError(f"assoc_recall needs 1 <= n_keys <= num_symbols (got {n_keys}, {params['num_symbols']})")
    else:
        params["modulus"] = int(_cfg_get(syn_cfg, "modulus", 97))
        if params["modulus"] < 2:
            raise ValueError(f"mod_add needs modulus >= 2 (got {params['modulus']})")
    return params


def synthetic_tokenizer(params: dict) -> FixedVocabTokenizer:
    if params["task"] == "assoc_recall":
        n = params["num_symbols"]
        words = [PAD, EOS, "?", "->"] + [f"k{i}" for i in range(n)] + [f"v{i}" for i in range(n)]
        name = f"assoc_recall-{n}sym"
    else:
        words = [PAD, EOS, "+", "="] + [str(i) for i in range(params["modulus"])]
        name = f"mod_add-{params['modulus']}"
    return FixedVocabTokenizer(words, eos=EOS, name=name)


def _assoc_recall(rng: np.random.Generator, count: int, params: dict, tok: FixedVocabTokenizer):
    """(count, 2n+5) token ids and the column of the '->' token (whose target is the answer)."""
    n, n_sym = params["n_keys"], params["num_symbols"]
    key0, value0 = tok.token_id("k0"), tok.token_id("v0")
    keys = np.argsort(rng.random((count, n_sym)), axis=1)[:, :n]  # distinct keys per example
    values = rng.integers(0, n_sym, size=(count, n))
    query = rng.integers(0, n, size=count)
    rows = np.arange(count)
    examples = np.empty((count, 2 * n + 5), dtype=np.int64)
    examples[:, 0 : 2 * n : 2] = key0 + keys
    examples[:, 1 : 2 * n : 2] = value0 + values
    examples[:, 2 * n] = tok.token_id("?")
    examples[:, 2 * n + 1] = key0 + keys[rows, query]
    examples[:, 2 * n + 2] = tok.token_id("->")
    examples[:, 2 * n + 3] = value0 + values[rows, query]
    examples[:, 2 * n + 4] = tok.eos_id
    return examples, 2 * n + 2


def _mod_add_pairs(params: dict) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint (a, b) pairs for train and val, so val measures generalisation, not memory."""
    p = params["modulus"]
    order = np.random.default_rng([params["seed"], 2]).permutation(p * p)
    n_val = min(params["num_val"], (p * p) // 2)
    val_pairs, rest = order[:n_val], order[n_val:]
    rng = np.random.default_rng([params["seed"], 0])
    train_pairs = rng.choice(rest, size=params["num_train"], replace=params["num_train"] > len(rest))
    return train_pairs, val_pairs


def _mod_add(pairs: np.ndarray, params: dict, tok: FixedVocabTokenizer):
    p = params["modulus"]
    a, b = pairs // p, pairs % p
    zero = tok.token_id("0")
    examples = np.stack(
        [
            zero + a,
            np.full_like(a, tok.token_id("+")),
            zero + b,
            np.full_like(a, tok.token_id("=")),
            zero + (a + b) % p,
            np.full_like(a, tok.eos_id),
        ],
        axis=1,
    )
    return examples, 3


def pack(examples: np.ndarray, answer_col: int, seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Pack (N, L) examples into blocks of seq_len tokens; return flat tokens and mask (+1 trailing pad).

    The trailing pad lets the last block be read as a full window of seq_len + 1 tokens.
    """
    count, length = examples.shape
    per_block = seq_len // length
    if per_block < 1:
        raise ValueError(f"data.seq_len={seq_len} is shorter than one synthetic example ({length} tokens)")
    n_blocks = -(-count // per_block)
    tokens = np.full((n_blocks * per_block, length), pad_id, dtype=np.int64)
    tokens[:count] = examples
    mask = np.zeros_like(tokens, dtype=np.uint8)
    mask[:count, answer_col] = 1
    blocks = np.full((n_blocks, seq_len), pad_id, dtype=np.int64)
    block_mask = np.zeros((n_blocks, seq_len), dtype=np.uint8)
    blocks[:, : per_block * length] = tokens.reshape(n_blocks, per_block * length)
    block_mask[:, : per_block * length] = mask.reshape(n_blocks, per_block * length)
    return np.append(blocks.ravel(), pad_id), np.append(block_mask.ravel(), 0).astype(np.uint8)


def generate(params: dict, seq_len: int):
    """Returns (tokenizer, (train_tokens, train_mask), (val_tokens, val_mask)), all 1-D arrays."""
    tok = synthetic_tokenizer(params)
    pad = tok.token_id(PAD)
    if params["task"] == "assoc_recall":
        train = _assoc_recall(np.random.default_rng([params["seed"], 0]), params["num_train"], params, tok)
        val = _assoc_recall(np.random.default_rng([params["seed"], 1]), params["num_val"], params, tok)
    else:
        train_pairs, val_pairs = _mod_add_pairs(params)
        train, val = _mod_add(train_pairs, params, tok), _mod_add(val_pairs, params, tok)
    return tok, pack(*train, seq_len, pad), pack(*val, seq_len, pad)
