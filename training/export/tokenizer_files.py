"""Our tokenizers as Hugging Face tokenizer files (tokenizer.json + tokenizer_config.json), for every export format."""

from __future__ import annotations

import json
from pathlib import Path

from training.data.tokenizer import EOS_TOKEN, BytesTokenizer, HFTokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable character map, the alphabet of the ``tokenizers`` ByteLevel steps."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b if b in printable else next(extra)) for b in range(256)}


def tokenizer_backend(tokenizer):
    """A ``tokenizers.Tokenizer`` that encodes text to the same ids as ours, or None if it has none.

    Byte-level BPE and hub tokenizers are already ``tokenizers`` objects. Raw bytes become a
    byte-level BPE with no merges (id = byte value) plus ``<|endoftext|>`` at 256.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if isinstance(tokenizer, HFTokenizer):
        return Tokenizer.from_str(tokenizer.to_json())
    if isinstance(tokenizer, BytesTokenizer):
        vocab = {char: b for b, char in _bytes_to_unicode().items()}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        backend.add_special_tokens([AddedToken(EOS_TOKEN, special=True)])  # → id 256 = BytesTokenizer.eos_id
        return backend
    return None  # e.g. the fixed word vocabularies of the synthetic tasks


def save_tokenizer(tokenizer, out_dir: Path, max_length: int) -> bool:
    """Write tokenizer.json + tokenizer_config.json (a PreTrainedTokenizerFast); False if not expressible."""
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer_backend(tokenizer)
    if backend is None:
        return False
    eos = backend.id_to_token(tokenizer.eos_id) if tokenizer.eos_id is not None else None
    wrapped = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=eos, model_max_length=max_length)
    wrapped.save_pretrained(str(out_dir))
    # transformers 5 records its own class name; the 4.x name loads in both major versions.
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")
    return True


# ----------------------------------------------------------------------------- entry points
