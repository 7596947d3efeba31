"""The OpenAI-compatible routes both demo engines serve (``/v1/models``, chat, completions,
embeddings), close enough to the real ones that the official ``openai`` client works."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from reconciler.engines.demo.generation import (
    DEFAULT_MAX_TOKENS,
    count_tokens,
    embedding_base64,
    embedding_vector,
    generate_all,
    paced_tokens,
)
from reconciler.engines.demo.httpio import int_field, json_error, read_json, stream_out, text_of
from reconciler.engines.demo.stats import Stats
from reconciler.kit import clock


def new_id(prefix: str) -> str:
    """An OpenAI-style object id."""
    return f"{prefix}-{uuid.uuid4().hex}"


def openai_error(status: int, message: str, err_type: str) -> web.HTTPException:
    """The OpenAI error envelope, which the openai client turns into typed exceptions."""
    return json_error(status, {"error": {"message": message, "type": err_type, "param": None, "code": status}})


def openai_bad_request(message: str) -> web.HTTPException:
    return openai_error(400, message, "BadRequestError")


def sse(payload: object) -> bytes:
    """One Server-Sent Event."""
    return f"data: {json.dumps(payload)}\n\n".encode()


SSE_DONE = b"data: [DONE]\n\n"

Resolver = Callable[[object], Awaitable[str]]
"""Maps a request's ``model`` field to the served name, raising the engine's 404 if unknown."""


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class _Job:
    """One parsed OpenAI generation request."""

    model: str
    max_tokens: int
    prompt_tokens: int
    stream: bool
    include_usage: bool


class OpenAIApi:
    """The OpenAI-compatible routes, shared by the vLLM-like and Ollama-like engines."""

    def __init__(
        self,
        *,
        resolve: Resolver,
        model_cards: Callable[[], list[dict[str, Any]]],
        stats: Stats,
        token_delay_ms: float,
    ) -> None:
        self._resolve = resolve
        self._model_cards = model_cards
        self._stats = stats
        self._delay_ms = token_delay_ms

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/embeddings", self.embeddings)

    async def models(self, _: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": self._model_cards()})

    async def _job(self, body: dict[str, Any], prompt: str) -> _Job:
        model = await self._resolve(body.get("model"))
        options = body.get("stream_options")
        tokens = count_tokens(prompt)
        self._stats.prompt_tokens += tokens
        return _Job(
            model=model,
            max_tokens=int_field(body, "max_completion_tokens", "max_tokens", default=DEFAULT_MAX_TOKENS),
            prompt_tokens=tokens,
            stream=bool(body.get("stream", False)),
            include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, openai_bad_request)
        messages = body.get("messages")
        if not isinstance(messages, list):
            raise openai_bad_request("'messages' must be a list")
        job = await self._job(body, text_of(messages))
        if job.stream:
            return await stream_out(request, self._stats, "text/event-stream", self._chat_chunks(job))
        with self._stats.track(streaming=False):
            text = await generate_all(job.max_tokens, self._delay_ms)
        self._stats.generation_tokens += job.max_tokens
        message = {"role": "assistant", "content": text, "tool_calls": []}
        choice = {"index": 0, "message": message, "finish_reason": "length", "logprobs": None}
        return web.json_response(self._envelope("chat.completion", "chatcmpl", job, [choice]))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request, openai_bad_request)
        job = await self._job(body, text_of(body.get("prompt", "")))
        if job.stream:
            return await stream_out(request, self._stats, "text/event-stream", self._completion_chunks(job))
        with self._stats.track(streaming=False):
            text = await generate_all(job.max_tokens, self._delay_ms)
        self._stats.generation_tokens += job.max_tokens
        choice = {"index": 0, "text": text, "finish_reason": "length", "logprobs": None}
        return web.json_response(self._envelope("text_completion", "cmpl", job, [choice]))

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await read_json(request, openai_bad_request)
        raw = body.get("input", "")
        inputs = raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
        model = await self._resolve(body.get("model"))
        as_b64 = body.get("encoding_format") == "base64"
        with self._stats.track(streaming=False):
            data = [
                {"object": "embedding", "index": i, "embedding": self._vector(text_of(x), as_b64)}
                for i, x in enumerate(inputs)
            ]
        prompt = sum(count_tokens(text_of(x)) for x in inputs)
        usage = {"prompt_tokens": prompt, "total_tokens": prompt}
        return web.json_response({"object": "list", "model": model, "data": data, "usage": usage})

    @staticmethod
    def _vector(text: str, as_b64: bool) -> list[float] | str:
        vector = embedding_vector(text)
        return embedding_base64(vector) if as_b64 else vector

    @staticmethod
    def _envelope(obj: str, prefix: str, job: _Job, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": new_id(prefix),
            "object": obj,
            "created": int(clock.now().timestamp()),
            "model": job.model,
            "choices": choices,
            "usage": _usage(job.prompt_tokens, job.max_tokens),
        }

    def _chunk(self, obj: str, cid: str, job: _Job, choice: dict[str, Any]) -> dict[str, Any]:
        created = int(clock.now().timestamp())
        return {
            "id": cid,
            "object": obj,
            "created": created,
            "model": job.model,
            "choices": [choice],
        }

    async def _chat_chunks(self, job: _Job) -> AsyncIterator[bytes]:
        cid, obj = new_id("chatcmpl"), "chat.completion.chunk"
        i = 0
        async for token in paced_tokens(job.max_tokens, self._delay_ms):
            delta = {"role": "assistant", "content": token} if i == 0 else {"content": token}
            choice = {"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}
            self._stats.generation_tokens += 1
            i += 1
            yield sse(self._chunk(obj, cid, job, choice))
        last = {"index": 0, "delta": {}, "finish_reason": "length", "logprobs": None}
        yield sse(self._chunk(obj, cid, job, last))
        async for tail in self._usage_tail(obj, cid, job):
            yield tail

    async def _completion_chunks(self, job: _Job) -> AsyncIterator[bytes]:
        cid, obj = new_id("cmpl"), "text_completion"
        async for token in paced_tokens(job.max_tokens, self._delay_ms):
            choice = {"index": 0, "text": token, "finish_reason": None, "logprobs": None}
            self._stats.generation_tokens += 1
            yield sse(self._chunk(obj, cid, job, choice))
        last = {"index": 0, "text": "", "finish_reason": "length", "logprobs": None}
        yield sse(self._chunk(obj, cid, job, last))
        async for tail in self._usage_tail(obj, cid, job):
            yield tail

    async def _usage_tail(self, obj: str, cid: str, job: _Job) -> AsyncIterator[bytes]:
        """The optional usage-only chunk (``stream_options.include_usage``), then [DONE]."""
        if job.include_usage:
            chunk = self._chunk(obj, cid, job, {})
            chunk["choices"] = []
            chunk["usage"] = _usage(job.prompt_tokens, job.max_tokens)
            yield sse(chunk)
        yield SSE_DONE
