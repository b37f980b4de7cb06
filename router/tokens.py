"""Prompt lengths in tokens: exact with the model's tokenizer, estimated without one.

The estimate is ``ceil(utf-8 bytes / 4)`` (about four bytes per token for English
text with Llama-3-class tokenizers), plus 4 tokens per chat message for the chat
template. It decides mode auto's prefill skip and ``maxPromptTokens`` when no
tokenizer is configured; configure one (``tokenizer:`` a ``tokenizer.json``) when
those decisions must be exact.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Protocol

__all__ = ["BYTES_PER_TOKEN", "EstimatingCounter", "TokenCounter", "TokenizerCounter", "load"]

logger = logging.getLogger(__name__)

BYTES_PER_TOKEN = 4
CHAT_MESSAGE_OVERHEAD = 4


class TokenCounter(Protocol):
    exact: bool

    def count(self, text: str) -> int: ...


class EstimatingCounter:
    exact = False

    def count(self, text: str) -> int:
        n = len(text) if text.isascii() else len(text.encode())
        return -(-n // BYTES_PER_TOKEN)


class TokenizerCounter:
    """Counts with a Hugging Face ``tokenizers`` tokenizer (no special tokens)."""

    exact = True

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)


def load(path: str | None) -> TokenCounter:
    """The model's tokenizer when ``path`` names one and ``tokenizers`` is installed,
    else the estimate (logged once, so a missing tokenizer is visible)."""
    if not path:
        return EstimatingCounter()
    file = Path(path)
    if file.is_dir():
        file = file / "tokenizer.json"
    try:
        import tokenizers
    except ImportError:
        logger.warning(
            "tokenizer %s configured but `tokenizers` is not installed: estimating", path
        )
        return EstimatingCounter()
    try:
        return TokenizerCounter(tokenizers.Tokenizer.from_file(str(file)))
    except Exception as exc:  # the library raises plain Exception on a bad file
        logger.warning("cannot load tokenizer %s (%s): estimating prompt lengths", file, exc)
        return EstimatingCounter()
