"""A tiny random-weight Llama, built locally in well under a second.

Tests and local demos must never fetch from a model hub, yet vLLM wants a real
Hugging Face directory: ``config.json``, ``model.safetensors`` and tokenizer
files with a chat template. :func:`build_tiny_model` writes one: a byte-level BPE
tokenizer trained here on a small built-in corpus, and Llama weights drawn from
a seeded generator, so the same seed gives the same bytes on every machine.

Weights are written with the standard library only (safetensors is a JSON
header plus raw little-endian arrays), so building needs just ``tokenizers``.
"""

from __future__ import annotations

import array
import hashlib
import json
import logging
import math
import os
import random
import shutil
import struct
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BUILDER_VERSION = 1
"""Bumped whenever the output of :func:`build_tiny_model` changes; part of the cache key."""

MARKER = ".tandem-tiny-model"
"""Written last into a finished model directory: its content is the cache key."""

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, IM_START, IM_END)
"""Trained first, so their ids are 0..4 in this order."""

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML-style; vLLM's chat endpoint renders it with the tokenizer's Jinja."""

CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Prefill reads the whole prompt at once and sets the time to first token.",
    "Decode makes one token per step and re-reads the weights and the KV cache.",
    "A router sends the prompt to a prefill worker, then the request to a decode worker.",
    "The decode worker pulls the key and value blocks from the prefill worker with NIXL.",
    "Kubernetes runs the pods; the operator reconciles an InferencePool into Deployments.",
    "The autoscaler watches queue depth, TTFT and TPOT and scales each pool on its own.",
    "Hello! How are you today? I am fine, thank you. What would you like to know?",
    "Tell me a story about a small robot who learns to paint the sea at night.",
    "Once upon a time there was a little model with two layers and a tiny vocabulary.",
    "It could count: one, two, three, four, five, six, seven, eight, nine, ten.",
    "Numbers like 0 1 2 3 4 5 6 7 8 9 10 42 100 2048 and 3.14 appear in text.",
    "Python code: def add(a, b): return a + b  # adds two numbers",
    'JSON looks like {"role": "user", "content": "hi"} with quotes and braces.',
    "The weather is sunny in the morning, cloudy at noon and rainy in the evening.",
    "Cats sleep, dogs bark, birds sing, fish swim and people write software.",
    "user assistant system: you are a helpful assistant that answers briefly.",
    "Latency, throughput, memory bandwidth and compute bound are common words here.",
)
"""Small and fixed: the tokenizer only has to cover English-ish text reasonably."""


@dataclass(frozen=True)
class TinyShape:
    """The architecture of a tiny model; any change gives a different model."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int = 32
    """Explicit: vLLM's CPU attention kernels need a head size of 32 or more."""
    vocab_size: int = 512
    """Target size of the trained tokenizer's vocabulary (special tokens included)."""
    max_position_embeddings: int = 2048
    init_std: float = 0.5
    """Standard deviation of the embeddings (projections are scaled by fan-in):
    large enough that greedy decoding has clear winners, not near-ties."""


def cache_key(*, seed: int, shape: TinyShape) -> str:
    """A short stable digest of everything that decides the built files."""
    blob = json.dumps(
        {"builder": BUILDER_VERSION, "seed": seed, "shape": asdict(shape)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_tiny_model(dest: Path, *, seed: int = 0, shape: TinyShape | None = None) -> Path:
    """Write a tiny Llama model directory at ``dest`` (created; must not hold a model).

    The same ``seed`` and ``shape`` always give byte-identical files.
    Returns ``dest``.
    """
    shape = shape or TinyShape()
    dest.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(dest, shape)
    _write_config(dest, shape, vocab_size)
    _write_weights(dest / "model.safetensors", _tensor_specs(shape, vocab_size), seed)
    (dest / MARKER).write_text(cache_key(seed=seed, shape=shape) + "\n")
    return dest


def cached_tiny_model(root: Path, *, seed: int = 0, shape: TinyShape | None = None) -> Path:
    """The model for ``seed``/``shape`` under ``root``, built on first use.

    Safe across processes (a test session and its workers): the model is built in
    a temporary directory next to its final place and renamed into it.
    """
    shape = shape or TinyShape()
    key = cache_key(seed=seed, shape=shape)
    final = root / f"tiny-llama-{key}"
    if _is_complete(final, key):
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".tiny-llama-{key}-", dir=root))
    try:
        build_tiny_model(staging, seed=seed, shape=shape)
        try:
            os.rename(staging, final)
        except OSError:
            # Another process won the race; its copy is identical.
            if not _is_complete(final, key):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("built tiny model %s (seed=%d)", final, seed)
    return final


def _is_complete(path: Path, key: str) -> bool:
    marker = path / MARKER
    return marker.is_file() and marker.read_text().strip() == key


def _write_tokenizer(dest: Path, shape: TinyShape) -> int:
    # Imported here so that importing this module needs no engine packages.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=shape.vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(CORPUS) * 4, trainer=trainer)
    tokenizer.save(str(dest / "tokenizer.json"))

    vocab_size: int = tokenizer.get_vocab_size()
    ids = {token: tokenizer.token_to_id(token) for token in SPECIAL_TOKENS}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": shape.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": {
            str(ids[token]): {
                "content": token,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for token in SPECIAL_TOKENS
        },
    }
    _write_json(dest / "tokenizer_config.json", tokenizer_config)
    _write_json(
        dest / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )
    _write_json(
        dest / "generation_config.json",
        {"bos_token_id": ids[BOS_TOKEN], "eos_token_id": [ids[EOS_TOKEN], ids[IM_END]],
         "pad_token_id": ids[PAD_TOKEN]},
    )  # fmt: skip
    return vocab_size


def _write_config(dest: Path, shape: TinyShape, vocab_size: int) -> None:
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": SPECIAL_TOKENS.index(BOS_TOKEN),
        "eos_token_id": SPECIAL_TOKENS.index(EOS_TOKEN),
        "pad_token_id": SPECIAL_TOKENS.index(PAD_TOKEN),
        "dtype": "float32",
        "head_dim": shape.head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.hidden_size,
        "initializer_range": shape.init_std,
        "intermediate_size": shape.intermediate_size,
        "max_position_embeddings": shape.max_position_embeddings,
        "mlp_bias": False,
        "num_attention_heads": shape.num_attention_heads,
        "num_hidden_layers": shape.num_hidden_layers,
        "num_key_value_heads": shape.num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab_size,
    }
    _write_json(dest / "config.json", config)


def _tensor_specs(shape: TinyShape, vocab: int) -> list[tuple[str, list[int], float]]:
    """(name, shape, std) of every tensor in a fixed order; std 0 means ones (norms)."""
    h, i, d = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * d, shape.num_key_value_heads * d

    def std(fan_in: int) -> float:
        # Scaled by fan-in so activations stay of the same order through the layers.
        return shape.init_std * math.sqrt(shape.hidden_size / fan_in)

    specs: list[tuple[str, list[int], float]] = [
        ("model.embed_tokens.weight", [vocab, h], shape.init_std)
    ]
    for layer in range(shape.num_hidden_layers):
        p = f"model.layers.{layer}."
        specs += [
            (p + "input_layernorm.weight", [h], 0.0),
            (p + "self_attn.q_proj.weight", [q, h], std(h)),
            (p + "self_attn.k_proj.weight", [kv, h], std(h)),
            (p + "self_attn.v_proj.weight", [kv, h], std(h)),
            (p + "self_attn.o_proj.weight", [h, q], std(q)),
            (p + "post_attention_layernorm.weight", [h], 0.0),
            (p + "mlp.gate_proj.weight", [i, h], std(h)),
            (p + "mlp.up_proj.weight", [i, h], std(h)),
            (p + "mlp.down_proj.weight", [h, i], std(i)),
        ]
    specs += [
        ("model.norm.weight", [h], 0.0),
        ("lm_head.weight", [vocab, h], std(h)),
    ]
    return specs


def _write_weights(path: Path, specs: list[tuple[str, list[int], float]], seed: int) -> None:
    """Write seeded random float32 tensors in the safetensors format.

    Layout: an 8-byte little-endian header length, a JSON header mapping each
    name to dtype/shape/byte offsets, then the raw little-endian data.
    """
    rng = random.Random(seed)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    blobs: list[bytes] = []
    offset = 0
    for name, dims, std in specs:
        count = math.prod(dims)
        if std == 0.0:
            values = array.array("f", [1.0]) * count
        else:
            values = array.array("f", [rng.gauss(0.0, std) for _ in range(count)])
        if sys.byteorder != "little":
            values.byteswap()
        blob = values.tobytes()
        header[name] = {"dtype": "F32", "shape": dims, "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # data starts 8-byte aligned
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        for blob in blobs:
            out.write(blob)


def _write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


__all__ = [
    "CHAT_TEMPLATE",
    "MARKER",
    "TinyShape",
    "build_tiny_model",
    "cache_key",
    "cached_tiny_model",
]
