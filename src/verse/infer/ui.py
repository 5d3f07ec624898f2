"""The Gradio chat UI of `verse chat --ui`: streamed replies, reasoning in a collapsible box, stop and reset.

All requests that use the model share one queue (`concurrency_id="model"`): with limit 1 concurrent users are
served in turn; with a batching engine (`--slots N`) up to N replies decode together in its batch. Inputs are
bounded (message and system prompt length, max tokens, sampling ranges, NaN included) and only ever reach the
tokenizer: nothing typed is used as a path or a command. The chat takes no files, so Gradio's upload route is
closed; clients see `VerseError` messages (about their input) and a generic line for anything else, whose detail
goes to the server log.
"""

import logging
import math
import os
from typing import Any, Callable, Dict, Iterator, List, Optional

from verse.infer.chat import TextDeltas, fit_messages, opens_in_think, split_reasoning, stream_text

MAX_MESSAGE_CHARS = 4000
MAX_NEW_TOKENS = 1024
MAX_QUEUE = 64
INTERNAL_ERROR = "internal error while answering; the server log has the details"
log = logging.getLogger(__name__)

Messages = List[Dict[str, str]]


def clamp(value: Any, low: float, high: float, default: float) -> float:
    """`value` as a float within [low, high]; `default` when it is not a number or is NaN."""
    try:
        value = float(value)
    except (TypeError, ValueError, OverflowError):
        return default
    return default if math.isnan(value) else min(max(value, low), high)


def client_error(error: Exception) -> str:
    """What a UI client is told about `error`: a `VerseError`'s own line (it is about their input), else a generic
    line; the full traceback goes to the server log."""
    from verse.errors import VerseError

    if isinstance(error, VerseError):
        return str(error)
    log.error("chat UI request failed", exc_info=error)
    return INTERNAL_ERROR


class NoUploads:
    """ASGI middleware refusing Gradio's file upload route (the chat takes no files; uploads were unbounded and
    never deleted)."""

    def __init__(self, app: Callable):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"].rstrip("/").endswith("/upload"):
            await send({"type": "http.response.start", "status": 403,
                        "headers": [(b"content-type", b"text/plain; charset=utf-8")]})
            await send({"type": "http.response.body", "body": b"uploads are disabled"})
            return
        await self.app(scope, receive, send)


def _display(history: Messages, opened: bool) -> List[dict]:
    """Chatbot messages for a raw history: an assistant's `<think>` part becomes a collapsible "Reasoning" box."""
    shown = []
    for message in history:
        if message["role"] != "assistant":
            shown.append({"role": message["role"], "content": message["content"]})
            continue
        reasoning, answer = split_reasoning(message["content"], opened)
        if reasoning:
            shown.append({"role": "assistant", "content": reasoning, "metadata": {"title": "Reasoning"}})
        if answer or not reasoning:
            shown.append({"role": "assistant", "content": answer})
    return shown


class ChatBackend:
    """The model side of the UI: bounded, streamed replies to a conversation.

    Args:
        model (ReasoningLLM): the model.
        tokenizer: its tokenizer.
        generation (Optional[dict]): default `generate.stream` keyword arguments (stop strings, top_k, seed ...).
        engine (Optional[Engine]): a running continuous-batching engine: replies to several users then decode
            together in its batch; None generates each reply alone.
    """

    def __init__(self, model, tokenizer, generation: Optional[dict] = None, engine=None):
        self.model, self.tokenizer, self.engine = model, tokenizer, engine
        self.generation = dict(generation or {})
        self.max_len = engine.max_len if engine is not None else model.args.max_seq_len
        self.max_new_tokens = max(1, min(MAX_NEW_TOKENS, self.max_len // 2))

    def reply(self, message: str, history: Messages, system: str, temperature: float, top_p: float,
              max_new_tokens: int) -> Iterator[str]:
        """Stream the assistant's reply text to `message` after `history` (inputs clamped to safe ranges).

        Args:
            message (str): the user's message (cut at `MAX_MESSAGE_CHARS`).
            history (Messages): earlier turns (oldest dropped when the prompt is too long).
            system (str): system prompt ("" for none; cut at `MAX_MESSAGE_CHARS`).
            temperature (float): clamped to [0, 2].
            top_p (float): clamped to [0.01, 1].
            max_new_tokens (int): clamped to [1, `self.max_new_tokens`].

        Yields:
            str: pieces of the reply text.
        """
        messages = ([{"role": "system", "content": system[:MAX_MESSAGE_CHARS]}] if system.strip() else [])
        messages += history + [{"role": "user", "content": message[:MAX_MESSAGE_CHARS]}]
        max_new_tokens = int(clamp(max_new_tokens, 1, self.max_new_tokens, self.max_new_tokens))
        _, prompt = fit_messages(self.tokenizer, messages, self.max_len - max_new_tokens)
        kwargs = {**self.generation, "max_new_tokens": max_new_tokens,
                  "temperature": clamp(temperature, 0.0, 2.0, 0.0), "top_p": clamp(top_p, 0.01, 1.0, 1.0)}
        if self.engine is None:
            yield from stream_text(self.model, self.tokenizer, prompt, **kwargs)
            return
        from verse.infer.engine import Request
        from verse.infer.sampling import SamplingParams

        params = SamplingParams(kwargs["temperature"], kwargs.get("top_k", 0), kwargs["top_p"],
                                kwargs.get("repetition_penalty", 1.0))
        request = Request(prompt, max_new_tokens, params, kwargs.get("seed"), kwargs.get("stop_strings") or ())
        deltas = TextDeltas(self.tokenizer)
        for ids in self.engine.stream(request):  # closing this generator (Stop) cancels the request
            if text := deltas.feed(ids):
                yield text
        if text := deltas.flush():
            yield text

    def opened(self, system: str) -> bool:
        """Whether replies start inside `<think>` (the template opens it)."""
        messages = ([{"role": "system", "content": system}] if system.strip() else [])
        return opens_in_think(self.tokenizer, messages + [{"role": "user", "content": "."}])


def build_ui(model, tokenizer, system: Optional[str] = None, generation: Optional[dict] = None, engine=None):
    """The Gradio app (not launched).

    Args:
        model (ReasoningLLM): the model.
        tokenizer: its tokenizer.
        system (Optional[str]): initial system prompt.
        generation (Optional[dict]): default generation settings (`temperature`, `top_p`, `max_new_tokens` seed
            the controls; the rest is passed to `generate.stream`).
        engine (Optional[Engine]): a running batching engine; up to `engine.slots` replies are then generated at
            once (in one batch) instead of one at a time.

    Returns:
        gradio.Blocks: the app, with its queue configured; `/chat` is also an API endpoint (message, system,
        temperature, top_p, max_new_tokens) -> reply text.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    generation = dict(generation or {})
    temperature = generation.pop("temperature", 0.7) or 0.0
    top_p = generation.pop("top_p", 1.0)
    backend = ChatBackend(model, tokenizer, generation, engine)
    max_new = min(generation.pop("max_new_tokens", 256), backend.max_new_tokens)
    backend.generation = generation

    def respond(message: str, history: Messages, system_prompt: str, temp: float, nucleus: float, max_tokens: int):
        if not message.strip():
            yield gr.update(), history, gr.update()
            return
        opened = backend.opened(system_prompt)
        turn = history + [{"role": "user", "content": message[:MAX_MESSAGE_CHARS]},
                          {"role": "assistant", "content": ""}]
        yield _display(turn, opened), turn, ""
        try:
            for piece in backend.reply(message, history, system_prompt, temp, nucleus, max_tokens):
                turn[-1] = {"role": "assistant", "content": turn[-1]["content"] + piece}
                yield _display(turn, opened), turn, ""
        except Exception as e:  # noqa: BLE001 - every failure becomes one client line (detail in the server log)
            raise gr.Error(client_error(e)) from None

    def api_chat(message: str, system_prompt: str = "", temp: float = 0.0, nucleus: float = 1.0,
                 max_tokens: int = 64) -> str:
        """One stateless reply: the full text of the assistant's answer to `message`."""
        try:
            return "".join(backend.reply(message, [], system_prompt, temp, nucleus, max_tokens))
        except Exception as e:  # noqa: BLE001 - every failure becomes one client line (detail in the server log)
            raise gr.Error(client_error(e)) from None

    with gr.Blocks(title="Verse chat") as demo:
        gr.Markdown("### Verse chat")
        chatbot = gr.Chatbot(label="conversation", height=420, elem_id="chatbot")
        history = gr.State([])
        with gr.Row():
            box = gr.Textbox(placeholder="Message (Enter to send)", show_label=False, max_length=MAX_MESSAGE_CHARS,
                             scale=6, elem_id="message", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
            stop = gr.Button("Stop", variant="stop", scale=1, elem_id="stop")
            reset = gr.Button("Reset", scale=1, elem_id="reset")
        with gr.Accordion("Settings", open=False):
            system_box = gr.Textbox(value=system or "", label="system prompt", max_length=MAX_MESSAGE_CHARS, lines=2)
            temp = gr.Slider(0.0, 2.0, value=temperature, step=0.05, label="temperature (0 = greedy)")
            nucleus = gr.Slider(0.05, 1.0, value=top_p, step=0.05, label="top-p")
            max_tokens = gr.Slider(1, backend.max_new_tokens, value=max_new, step=1, label="max new tokens")
        inputs = [box, history, system_box, temp, nucleus, max_tokens]
        outputs = [chatbot, history, box]
        events = [trigger(respond, inputs, outputs, api_visibility="private", concurrency_id="model")
                  for trigger in (box.submit, send.click)]
        stop.click(None, cancels=events)
        reset.click(lambda: ([], [], ""), None, outputs, cancels=events, queue=False, api_visibility="private")
        gr.api(api_chat, api_name="chat", concurrency_id="model")
    demo.queue(max_size=MAX_QUEUE, default_concurrency_limit=engine.slots if engine is not None else 1)
    return demo


def serve(model, tokenizer, host: str = "127.0.0.1", port: int = 7860, system: Optional[str] = None,
          generation: Optional[dict] = None, block: bool = True, slots: int = 1):
    """Serve the chat UI until interrupted.

    Args:
        model (ReasoningLLM): the model.
        tokenizer: its tokenizer.
        host (str): address to listen on; 127.0.0.1 keeps it to this machine.
        port (int): TCP port.
        system (Optional[str]): initial system prompt.
        generation (Optional[dict]): default generation settings.
        block (bool): serve until interrupted; False returns at once with the server running (tests).
        slots (int): replies generated at once; above 1 they share a continuous-batching engine (`verse serve`'s).

    Returns:
        gradio.Blocks: the running app (`close()` stops it).
    """
    from starlette.middleware import Middleware

    engine = None
    if slots > 1:
        from verse.infer.engine import Engine

        engine = Engine(model, tokenizer, slots).start()
    demo = build_ui(model, tokenizer, system, generation, engine)
    print(f"Verse chat UI on http://{host}:{port} (Ctrl-C to stop)", flush=True)
    # show_error=False: only gr.Error lines (client_error) reach clients, never raw exception text
    demo.launch(server_name=host, server_port=port, share=False, show_error=False, footer_links=["api"],
                max_file_size=0, app_kwargs={"middleware": [Middleware(NoUploads)]}, prevent_thread_lock=not block,
                quiet=not block)
    return demo
