"""The OpenAI-compatible HTTP API of `verse serve` (FastAPI): chat and text completions on one batching engine.

`POST /v1/chat/completions` and `POST /v1/completions` (JSON, or server-sent events with `"stream": true`),
`GET /v1/models`, `GET /health`. Every request becomes an `engine.Request`; the engine thread decodes them all in
one batch and hands tokens back to the event loop. A reply's `<think>` part comes back as `reasoning_content`
(message and stream deltas), as vLLM and the DeepSeek API do. A bad request is answered 400 with OpenAI's error
shape `{"error": {"message", "type", "param", "code"}}` (413 for a body over the size cap); a client that goes away cancels its request, which frees
its slot.
"""

import asyncio
import json
import logging
import math
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Dict, List, Optional, Tuple

from verse.errors import VerseError
from verse.infer.chat import (ReasoningStream, TextDeltas, chat_prompt, opens_in_think, split_reasoning, text_prompt,
                              valid_text)
from verse.infer.engine import Engine, Request
from verse.infer.sampling import SamplingParams

log = logging.getLogger(__name__)
ROLES = ("system", "user", "assistant")
MAX_STOPS = 4  # as OpenAI's API
DISCONNECT_POLL_S = 0.5  # how often a waiting request checks that its client is still there
MAX_BODY_BYTES = 8 * 2**20  # a request body larger than this is refused (413) before it is read whole


class BadRequest(Exception):
    """A request the API refuses: its message, the offending field and an HTTP status."""

    def __init__(self, message: str, param: Optional[str] = None, status: int = 400,
                 kind: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.message, self.param, self.status, self.kind, self.code = message, param, status, kind, code


def error_body(message: str, kind: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _number(body: dict, name: str, default: Optional[float], low: float, high: float,
            integer: bool = False) -> Optional[float]:
    """Field `name` of `body` as a number in [low, high] (an int when `integer`), `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    kinds = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or (isinstance(value, float) and math.isnan(value)):
        raise BadRequest(f"'{name}' must be {'an integer' if integer else 'a number'}, got {json.dumps(value):.40}",
                         name)
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be in [{low}, {high}], got {value}", name)
    return value


def _stop(body: dict) -> List[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops) or len(stops) > MAX_STOPS:
        raise BadRequest(f"'stop' must be a string or a list of at most {MAX_STOPS} strings", "stop")
    return [valid_text(s) for s in stops if s]


def _content(message: Any, index: int) -> Dict[str, str]:
    """One chat message as {role, content}; content may be a string or a list of text parts."""
    where = f"messages[{index}]"
    if not isinstance(message, dict) or message.get("role") not in ROLES:
        raise BadRequest(f"{where} must be an object with a 'role' of {', '.join(ROLES)}", where)
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise BadRequest(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    return {"role": message["role"], "content": valid_text(content)}


def _template_kwargs(body: dict) -> Dict[str, bool]:
    """`chat_template_kwargs` of a chat request (vLLM's field; `enable_thinking` is the one Verse takes).

    Raises:
        BadRequest: not an object, another key, or a value that is not true/false.
    """
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise BadRequest("'chat_template_kwargs' must be an object", "chat_template_kwargs")
    unknown = sorted(set(kwargs) - {"enable_thinking"})
    if unknown:
        raise BadRequest(f"'chat_template_kwargs' may only set enable_thinking, got {unknown[0]!r:.80}",
                         "chat_template_kwargs")
    if not isinstance(kwargs.get("enable_thinking", False), bool):
        raise BadRequest("'chat_template_kwargs.enable_thinking' must be true or false", "chat_template_kwargs")
    return kwargs


class Server:
    """Turns API requests into engine requests and engine output into API responses.

    Args:
        engine (Engine): the running engine.
        tokenizer: the model's tokenizer.
        model_name (str): the id `/v1/models` lists and responses carry.
    """

    def __init__(self, engine: Engine, tokenizer, model_name: str):
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name

    def parse(self, body: Any, chat: bool) -> Tuple[Request, bool, bool, bool]:
        """Validate a request body; return (engine request, stream, include_usage, opened in <think>).

        Raises:
            BadRequest: what is wrong, naming the field.
        """
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise BadRequest("'model' must be a string", "model")
        if model is not None and model != self.model_name:
            raise BadRequest(f"the model '{model:.80}' does not exist; this server serves '{self.model_name}' "
                             "(GET /v1/models)", "model", 404, code="model_not_found")
        if _number(body, "n", 1, 1, 1, integer=True) != 1:
            raise BadRequest("only n=1 is supported", "n")
        for name in ("presence_penalty", "frequency_penalty"):
            if _number(body, name, 0, -2, 2):
                raise BadRequest(f"'{name}' is not supported (use repetition_penalty)", name)
        if body.get("logprobs") not in (None, False) or body.get("echo"):
            raise BadRequest("logprobs and echo are not supported", "logprobs" if body.get("logprobs") else "echo")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("'stream' must be true or false", "stream")
        options = body.get("stream_options") or {}
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        opened = False
        if chat:
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise BadRequest("'messages' must be a non-empty list of messages", "messages")
            messages = [_content(m, i) for i, m in enumerate(messages)]
            template_kwargs = _template_kwargs(body)
            prompt = chat_prompt(self.tokenizer, messages, **template_kwargs)
            opened = opens_in_think(self.tokenizer, messages, **template_kwargs)
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if isinstance(prompt, str):
                prompt = text_prompt(self.tokenizer, valid_text(prompt))
            elif not (isinstance(prompt, list) and prompt and all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.engine.model.args.vocab_size
                    for t in prompt)):
                raise BadRequest("'prompt' must be a string, a list of one string, or a list of token ids", "prompt")
        limit = self.engine.max_len
        if not prompt:
            raise BadRequest("the prompt is empty and the tokenizer has no BOS token to start from", "prompt")
        if len(prompt) >= limit:
            raise BadRequest(f"the prompt is {len(prompt)} tokens; this model's context is {limit} tokens (prompt + "
                             "completion): shorten the prompt", "messages" if chat else "prompt",
                             code="context_length_exceeded")
        name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = int(_number(body, name, limit - len(prompt), 1, math.inf, integer=True))
        if len(prompt) + max_tokens > limit:
            raise BadRequest(f"the prompt ({len(prompt)} tokens) + {name} ({max_tokens}) exceeds this model's context "
                             f"of {limit} tokens; lower {name} or shorten the prompt", name,
                             code="context_length_exceeded")
        try:
            params = SamplingParams(_number(body, "temperature", 1.0, 0, 2), _number(body, "top_k", 0, 0, math.inf, True),
                                    _number(body, "top_p", 1.0, 0, 1), _number(body, "repetition_penalty", 1.0, 0, 10))
        except VerseError as e:
            raise BadRequest(str(e)) from None
        seed = _number(body, "seed", None, 0, 2**64 - 1, integer=True)
        request = Request(prompt, max_tokens, params, seed, _stop(body))
        return request, stream, include_usage, opened

    async def run(self, request: Request, is_disconnected) -> AsyncIterator[Tuple[List[int], Optional[str]]]:
        """Submit `request` and yield (new ids, finish_reason) as the engine produces them; a consumer that stops
        early (a client gone) cancels the request, freeing its slot."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        request.on_update = lambda r, ids: loop.call_soon_threadsafe(queue.put_nowait, (list(ids), r.finish_reason))
        try:
            self.engine.submit(request)
        except VerseError as e:
            raise BadRequest(str(e)) from None
        try:
            checked = time.monotonic()
            while True:
                try:
                    ids, finish = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_POLL_S)
                except asyncio.TimeoutError:
                    ids, finish = None, None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    if await is_disconnected():
                        return
                    checked = time.monotonic()
                if ids is not None:
                    yield ids, finish
                    if finish is not None:
                        return
        finally:
            if not request.done.is_set():
                self.engine.cancel(request)

    def usage(self, request: Request) -> dict:
        return {"prompt_tokens": len(request.prompt), "completion_tokens": len(request.output),
                "total_tokens": len(request.prompt) + len(request.output)}

    async def complete(self, body: Any, chat: bool, is_disconnected):
        """Answer one API request: a response dict, or an async iterator of server-sent event lines."""
        request, stream, include_usage, opened = self.parse(body, chat)
        head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name}
        events = self.run(request, is_disconnected)
        if not stream:
            finish = None
            async for _, finish in events:
                pass
            if finish == "error":
                raise BadRequest(request.error or "generation failed", status=500, kind="server_error")
            if finish is None:  # the client went away
                return None
            text = self.tokenizer.decode(request.output)
            if chat:
                reasoning, answer = split_reasoning(text, opened)
                choice = {"index": 0, "message": {"role": "assistant", "content": answer,
                                                  "reasoning_content": reasoning or None},
                          "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {**head, "choices": [choice], "usage": self.usage(request)}
        return self._sse(head, request, events, chat, opened, include_usage)

    async def _sse(self, head: dict, request: Request, events: AsyncIterator, chat: bool, opened: bool,
                   include_usage: bool) -> AsyncIterator[str]:
        head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
        usage = {"usage": None} if include_usage else {}

        def chunk(finish: Optional[str] = None, text: str = "", reasoning: str = "") -> str:
            if chat:
                delta = {"content": text} if text else {}  # the closing chunk's delta is empty, as OpenAI's
                if reasoning:
                    delta["reasoning_content"] = reasoning
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice], **usage}, ensure_ascii=False)}\n\n"

        deltas, split = TextDeltas(self.tokenizer), ReasoningStream(opened)
        if chat:
            first = {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                          "logprobs": None, "finish_reason": None}], **usage}
            yield f"data: {json.dumps(first)}\n\n"
        async with aclosing(events):  # its `finally` cancels the engine request of a client gone
            async for ids, finish in events:
                text = deltas.feed(ids) + (deltas.flush() if finish is not None else "")
                if finish == "error":
                    yield f"data: {json.dumps(error_body(request.error or 'generation failed', 'server_error'))}\n\n"
                    return
                if chat:
                    reasoning, answer = split.feed(text)
                    if finish is not None:
                        more = split.flush()
                        reasoning, answer = reasoning + more[0], answer + more[1]
                    if reasoning or answer:
                        yield chunk(None, answer, reasoning)
                elif text:
                    yield chunk(None, text)
                if finish is not None:
                    yield chunk(finish)
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': self.usage(request)})}\n\n"
        yield "data: [DONE]\n\n"


async def read_body(http, limit: int) -> bytes:
    """The body of request `http`, read in chunks and refused (413) as soon as it is known to exceed `limit` bytes,
    so that an oversized upload never sits in memory whole.

    Args:
        http (starlette.requests.Request): the request.
        limit (int): most bytes accepted.

    Returns:
        bytes: the body.

    Raises:
        BadRequest: status 413 when the body (or its declared Content-Length) is over `limit`.
    """
    def too_large(size: str) -> BadRequest:
        return BadRequest(f"the request body is {size} bytes, over this server's limit of {limit} bytes "
                          "(verse serve --max-body-mb); send a shorter prompt", status=413, code="request_too_large")

    declared = http.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large(declared)
    chunks, size = [], 0
    async for chunk in http.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(f"more than {limit}")
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(engine: Engine, tokenizer, model_name: str, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI application of `verse serve`; it starts the engine thread on startup and stops it on shutdown.

    Args:
        engine (Engine): a batching engine over the model (not started).
        tokenizer: the model's tokenizer.
        model_name (str): the model id clients pass as `model`.
        max_body_bytes (int): larger request bodies are answered 413 (OpenAI's error shape).

    Returns:
        fastapi.FastAPI: the ASGI app.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request as HTTPRequest
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException

    server = Server(engine, tokenizer, model_name)

    @asynccontextmanager
    async def lifespan(app):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="Verse", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(BadRequest)
    async def bad_request(_, e: BadRequest):
        return JSONResponse(error_body(e.message, e.kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_, e: Exception):
        log.error("request failed", exc_info=e)
        return JSONResponse(error_body("internal error; the server log has the details", "server_error"),
                            status_code=500)

    async def answer(http: HTTPRequest, chat: bool):
        try:
            body = json.loads(await read_body(http, max_body_bytes))
        except (ValueError, RecursionError) as e:
            raise BadRequest(f"the request body is not valid JSON ({str(e)[:80]})") from None
        result = await server.complete(body, chat, http.is_disconnected)
        if result is None:
            return JSONResponse(error_body("client disconnected"), status_code=499)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await answer(http, chat=True)

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await answer(http, chat=False)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "verse",
                                            "max_model_len": engine.max_len}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": engine.slots, "free_slots": engine.free_slots,
                "waiting": len(engine.waiting)}

    return app
