"""A tiny real model for tests and the local cluster.

A Llama-architecture model with seeded random weights and a byte-level BPE
tokenizer trained here on a small built-in corpus, saved in the standard
Hugging Face layout. Everything that loads it is the real loading code
(`from_pretrained(path)`, `vllm serve path`), and nothing is downloaded.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN, IM_START, IM_END)

# ChatML: the assistant turn ends with <|im_end|>, which is also a stop token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Enough varied text for a few hundred BPE merges; content does not matter,
# only that training is deterministic and fast.
CORPUS = (
    "Nexus turns a rack of mixed GPU machines into one compute cluster.",
    "A job is a row first, then a message that carries only its id and attempt.",
    "Workers claim jobs with one conditional update and write results under a fencing token.",
    "The reconciler requeues lost work and expires the leases of silent workers.",
    "Queues carry routing, not data; large payloads live in object storage.",
    "Each node detects its GPUs, picks a tier, registers, and sends heartbeats.",
    "Model servers run as supervised subprocesses with their own CUDA context.",
    "Tensor parallelism splits each layer across GPUs; pipeline parallelism splits the layers into stages.",
    "The quick brown fox jumps over the lazy dog while the cluster hums along.",
    "Hello, world! How are you today? I am fine, thank you, and you?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 1000 3.14159 2.71828.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    '{"model": "tiny", "prompt": "Say hello", "max_tokens": 16, "temperature": 0.7}',
    "User: what is a proof of compute? Assistant: a seeded computation anyone can verify.",
    "Streaming sends token deltas as server-sent events until the answer is done.",
    "Batch inference splits a file of requests into chunks and merges results in order.",
)


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny model; the defaults give roughly a million parameters."""

    vocab_size: int = 1024  # BPE target; the model's vocabulary is the tokenizer's real size
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0


def train_tokenizer(vocab_size: int):
    """A byte-level BPE tokenizer trained on CORPUS; deterministic for a given size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    return tokenizer


def make_tiny_model(directory: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write the tiny model to `directory` (created) and return its path."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=train_tokenizer(spec.vocab_size),
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[IM_START, IM_END],
        chat_template=CHAT_TEMPLATE,
        model_max_length=spec.max_position_embeddings,
    )
    ids = {token: fast.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=[ids[EOS_TOKEN], ids[IM_END]],
        pad_token_id=ids[PAD_TOKEN],
        tie_word_embeddings=False,
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS_TOKEN],
        eos_token_id=[ids[EOS_TOKEN], ids[IM_END]],
        pad_token_id=ids[PAD_TOKEN],
        max_new_tokens=64,
    )
    model.save_pretrained(out)
    fast.save_pretrained(out)
    _make_tokenizer_config_portable(out / "tokenizer_config.json")
    return out


def _make_tokenizer_config_portable(tokenizer_config: Path) -> None:
    """Keep the template in tokenizer_config.json too: older loaders (and some
    servers) read it only from there, newer ones from chat_template.jinja.
    The class name transformers 5 writes (TokenizersBackend) is unknown to
    older loaders; PreTrainedTokenizerFast loads the same file everywhere."""
    data = json.loads(tokenizer_config.read_text())
    data["chat_template"] = CHAT_TEMPLATE
    data["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
