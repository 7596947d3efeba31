"""What the demo engines generate: a predictable word cycle, at a set pace per token, and
small deterministic embeddings, so tests can predict every answer."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct
from collections.abc import AsyncIterator

from reconciler.kit import clock

DEFAULT_MAX_TOKENS = 16
WORDS = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel")


def token_text(index: int) -> str:
    """The ``index``-th generated token: a fixed word cycle, so tests can predict output."""
    word = WORDS[index % len(WORDS)]
    return word if index == 0 else " " + word


def demo_text(n_tokens: int) -> str:
    """The full text an engine generates for ``n_tokens`` tokens."""
    return "".join(token_text(i) for i in range(n_tokens))


def count_tokens(text: str) -> int:
    """A stand-in tokenizer: whitespace words, at least one."""
    return max(1, len(text.split()))


def embedding_vector(text: str, dim: int = 16) -> list[float]:
    """A small deterministic vector in [-1, 1] derived from the text's hash."""
    digest = hashlib.sha256(text.encode()).digest()
    return [round(digest[i % len(digest)] / 127.5 - 1.0, 6) for i in range(dim)]


def embedding_base64(vector: list[float]) -> str:
    """float32 little-endian, base64: what the openai client asks for by default."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


async def token_pause(delay_ms: float) -> None:
    """The time one token takes to generate."""
    await asyncio.sleep(clock.real_seconds(delay_ms / 1000.0))


async def paced_tokens(n_tokens: int, delay_ms: float) -> AsyncIterator[str]:
    """Tokens one at a time, each after its generation delay."""
    for i in range(n_tokens):
        await token_pause(delay_ms)
        yield token_text(i)


async def generate_all(n_tokens: int, delay_ms: float) -> str:
    """A whole completion, taking as long as streaming it would."""
    await token_pause(delay_ms * n_tokens)
    return demo_text(n_tokens)
