"""`verse serve`: the OpenAI API over the batching engine, answered by the official `openai` client."""

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import uvicorn

from verse.cli import main
from verse.infer.chat import ReasoningStream, chat_prompt, split_reasoning, text_prompt
from verse.infer.engine import Engine
from verse.infer.generate import stream
from verse.infer.runtime import load_for_inference
from verse.infer.serve import create_app

SLOTS, MAX_LEN = 8, 128
BODY_CAP = 64 * 1024


@pytest.fixture(scope="module")
def checkpoint(tiny_byte_checkpoint):
    return tiny_byte_checkpoint


@pytest.fixture(scope="module")
def local(checkpoint):
    """The same model loaded the way `verse generate` loads it (the oracle side)."""
    return load_for_inference(str(checkpoint))


@pytest.fixture(scope="module")
def server(checkpoint):
    """`verse serve`'s app on a free loopback port, uvicorn in a thread."""
    model, tok = load_for_inference(str(checkpoint))
    engine = Engine(model.eval(), tok, SLOTS, MAX_LEN)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    uv = uvicorn.Server(uvicorn.Config(create_app(engine, tok, "tiny", max_body_bytes=BODY_CAP), log_level="warning"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", engine
    uv.should_exit = True
    thread.join(10)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def generated(model, tok, prompt, max_tokens, temperature=0.0, seed=None):
    """The text `verse generate` prints for this prompt (its `stream`, then one decode)."""
    return tok.decode(list(stream(model, tok, prompt, max_new_tokens=max_tokens, temperature=temperature, seed=seed)))


def test_openai_client_chat_and_completions(server, checkpoint, capsys):
    url, _ = server
    api = client(url)
    assert [m.id for m in api.models.list().data] == ["tiny"]
    with pytest.raises(openai.NotFoundError, match="does not exist") as refused:
        api.completions.create(model="gpt-4o", prompt="Hello", max_tokens=2)
    assert refused.value.code == "model_not_found"
    main(["generate", str(checkpoint), "--prompt", "Hello", "--max-new-tokens", "12", "--json"])
    want = json.loads(capsys.readouterr().out)["text"]
    done = api.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0)
    assert done.choices[0].text == want and done.choices[0].finish_reason == "length"
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (5, 12)  # the byte tokenizer: one id per byte, no BOS
    pieces = api.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in pieces) == want

    main(["generate", str(checkpoint), "--prompt", "Hi there", "--chat", "--max-new-tokens", "10", "--json"])
    reasoning, answer = split_reasoning(json.loads(capsys.readouterr().out)["text"])
    messages = [{"role": "user", "content": "Hi there"}]
    reply = api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0, seed=1)
    message = reply.choices[0].message
    assert (message.content, getattr(message, "reasoning_content", None) or "") == (answer, reasoning)
    assert reply.usage.completion_tokens == 10
    chunks = list(api.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer
    assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_sixteen_concurrent_clients_get_what_generate_gives(server, local):
    """16 clients at once (8 slots: half wait for a free one), greedy and seeded sampling, chat and completions."""
    url, engine = server
    model, tok = local
    api = client(url)
    jobs = [dict(prompt=f"Item {i}: " + "ab" * (i % 5), chat=i % 3 == 0, max_tokens=6 + i % 7,
                 temperature=0.0 if i % 2 else 0.9, seed=None if i % 2 else 100 + i) for i in range(16)]

    def ask(job):
        kwargs = dict(model="tiny", max_tokens=job["max_tokens"], temperature=job["temperature"], seed=job["seed"])
        if job["chat"]:
            m = api.chat.completions.create(messages=[{"role": "user", "content": job["prompt"]}], **kwargs)
            return (getattr(m.choices[0].message, "reasoning_content", None) or "", m.choices[0].message.content)
        return api.completions.create(prompt=job["prompt"], **kwargs).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(ask, jobs))
    for job, answer in zip(jobs, answers):
        if job["chat"]:
            prompt = chat_prompt(tok, [{"role": "user", "content": job["prompt"]}])
            want = split_reasoning(generated(model, tok, prompt, job["max_tokens"], job["temperature"], job["seed"]))
        else:
            prompt = text_prompt(tok, job["prompt"])
            want = generated(model, tok, prompt, job["max_tokens"], job["temperature"], job["seed"])
        assert answer == want, job
    assert engine.free_slots == SLOTS


def test_disconnect_mid_stream_frees_the_slot(server):
    url, engine = server
    body = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 100, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            next(response.iter_lines())  # the first event, then hang up
        assert engine.free_slots < SLOTS or engine.waiting  # still decoding when the client left
        deadline = time.monotonic() + 20
        while http.get(url + "/health").json()["free_slots"] != SLOTS:
            assert time.monotonic() < deadline, "the slot of a client gone was never freed"
            time.sleep(0.1)
    after = client(url).completions.create(model="tiny", prompt="Hi", max_tokens=3, temperature=0)
    assert after.choices[0].finish_reason == "length"


@pytest.mark.parametrize("content, body, param, code", [
    (b'{"model": "tiny", "prompt": ', None, None, None),
    (None, {"model": "tiny", "prompt": "x" * 200, "max_tokens": 4}, "prompt", "context_length_exceeded"),
    (None, {"model": "tiny", "prompt": "x" * 100, "max_tokens": 100}, "max_tokens", "context_length_exceeded"),
    (None, {"model": "tiny", "prompt": "hi", "temperature": "hot"}, "temperature", None),
    (None, {"model": "tiny", "prompt": "hi", "seed": -3}, "seed", None),
    (None, {"model": "tiny", "prompt": {"text": "hi"}}, "prompt", None),
    (None, {"model": 7, "prompt": "hi"}, "model", None),
    (None, ["not", "an", "object"], None, None),
])
def test_bad_requests_get_400_and_the_server_stays_up(server, content, body, param, code):
    url, engine = server
    response = httpx.post(url + "/v1/completions", content=content if content is not None else json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code) and error["message"]
    chat = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "robot", "content": "x"}]}, timeout=30)
    assert chat.status_code == 400 and chat.json()["error"]["param"] == "messages[0]"
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok"
    assert engine.free_slots == SLOTS


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_cap_gets_413_and_the_server_stays_up(server, chunked):
    """Declared (Content-Length) or streamed in chunks (no length), a body over the cap is refused with OpenAI's
    error shape; one just under it is read (and refused for its over-long prompt, a 400)."""
    url, engine = server

    def post(size):
        body = json.dumps({"model": "tiny", "prompt": "x" * size}).encode()
        content = (body[i:i + 4096] for i in range(0, len(body), 4096)) if chunked else body
        return httpx.post(url + "/v1/completions", content=content, headers={"Content-Type": "application/json"},
                          timeout=30)

    response = post(BODY_CAP)
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "request_too_large" and str(BODY_CAP) in error["message"]
    assert error["type"] == "invalid_request_error" and "\n" not in error["message"]
    under = post(BODY_CAP - 100)
    assert under.status_code == 400 and under.json()["error"]["code"] == "context_length_exceeded"
    assert httpx.get(url + "/health", timeout=30).json()["status"] == "ok" and engine.free_slots == SLOTS


def test_reasoning_stream_splits_like_the_whole_reply():
    """Fed in every two-piece split (tags cut anywhere), the deltas add up to `split_reasoning` of the whole."""
    for opened, text in [(False, "<think>\n2+2 is 4, check: 4</think>\n\nThe answer is 4."),
                         (True, "hmm, x < y </think> done"), (False, "no reasoning <thin here")]:
        for cut in range(len(text) + 1):
            split = ReasoningStream(opened)
            parts = [split.feed(text[:cut]), split.feed(text[cut:]), split.flush()]
            got = ("".join(p[0] for p in parts), "".join(p[1] for p in parts))
            assert got == split_reasoning(text, opened), (text, cut)


def test_serve_command_refuses_a_taken_port_in_one_line(checkpoint, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        assert main(["serve", str(checkpoint), "--port", str(taken.getsockname()[1])]) == 2
    finally:
        taken.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot listen on 127.0.0.1:" in err and "--port" in err
    assert main(["serve", str(checkpoint), "--slots", "0"]) == 2
    assert "--slots must be auto or a number >= 1" in capsys.readouterr().err
    assert main(["serve", str(checkpoint), "--max-body-mb", "0"]) == 2
    assert "--max-body-mb must be > 0" in capsys.readouterr().err
