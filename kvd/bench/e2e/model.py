"""The local model the end-to-end benchmark serves: a random-weight Llama with a word-level
tokenizer and a chat template of its own, so nothing is downloaded and aiperf's chat
endpoint (multi-turn) works against it.

Run in the vLLM environment (torch, transformers, tokenizers)::

    python -m kvd.bench.e2e.model DIR [--layers 8 --hidden 1024 ...]

The tokenizer's vocabulary is ``<unk> <s> </s>``, the chat markers, then pronounceable words;
text is split on whitespace, so a prompt of N words is N tokens and a turn's prompt extends
the previous turn's token for token (what prefix caching needs). ``words.txt`` in DIR lists
the words, for the trace generator.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

SPECIALS = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
# A message renders as "<|role|> content <|end|>"; the generation prompt is "<|assistant|>".
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|> ' }}"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ ' <|end|> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class ModelShape:
    """The served model's size. KV bytes per token: 2 (K, V) x layers x kv_heads x head_dim x 2 (bf16)."""

    layers: int = 8
    hidden: int = 1024
    heads: int = 8
    kv_heads: int = 2
    head_dim: int = 128
    vocab: int = 4096
    max_len: int = 16384

    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2


def words(n: int, seed: int = 1234) -> list[str]:
    """``n`` distinct lowercase pronounceable words, the same for the same seed."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        w = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def make_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    ws = words(vocab - len(SPECIALS))
    tok = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIALS + ws)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # A WordPiece decoder whose prefix never occurs joins tokens with one space: decode(encode(t)) == t.
    tok.decoder = decoders.WordPiece(prefix="##!!", cleanup=False)
    tok.add_special_tokens(SPECIALS)
    tok.save(str(out / "tokenizer.json"))
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", **special, "model_max_length": 1 << 20,
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE,
    }, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(special))
    (out / "words.txt").write_text("\n".join(ws) + "\n")


def make_model(out: Path, shape: ModelShape) -> None:
    """Weights (bf16, seeded), tokenizer and chat template in ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=2 * shape.hidden,
        num_hidden_layers=shape.layers, num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, max_position_embeddings=shape.max_len, bos_token_id=1, eos_token_id=2,
        pad_token_id=0, initializer_range=0.5,
    )
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    make_tokenizer(out, shape.vocab)
    (out / "kvd_shape.json").write_text(json.dumps(asdict(shape)))


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m kvd.bench.e2e.model")
    p.add_argument("out", type=Path)
    for name, value in asdict(ModelShape()).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = p.parse_args(argv)
    shape = ModelShape(**{k: getattr(args, k) for k in asdict(ModelShape())})
    make_model(args.out, shape)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
