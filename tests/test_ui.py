"""`verse chat --ui`: the Gradio app in a real headless chromium (Playwright) and under 20 concurrent API calls.

The browser and load tests start the real command in a subprocess on loopback and are marked slow (the server
alone takes ~20-40 s to start on a busy 2-core machine). The display helpers are tested fast, by hand.
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import verse
from verse import ModelArgs, ReasoningLLM
from verse.infer.ui import MAX_MESSAGE_CHARS, ChatBackend, _display

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"


def test_display_puts_reasoning_in_a_collapsible_message():
    history = [{"role": "user", "content": "2+2?"},
               {"role": "assistant", "content": "<think>2 and 2 make 4</think>The answer is 4."}]
    assert _display(history, opened=False) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "2 and 2 make 4", "metadata": {"title": "Reasoning"}},
        {"role": "assistant", "content": "The answer is 4."},
    ]
    # the template opened <think> itself; the reply is still reasoning (no answer yet)
    assert _display([{"role": "assistant", "content": "still thinking"}], opened=True) == [
        {"role": "assistant", "content": "still thinking", "metadata": {"title": "Reasoning"}}]


def test_backend_bounds_its_inputs():
    class Spy:
        def __init__(self):
            self.lengths = []

        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
            self.lengths = [len(m["content"]) for m in messages]
            return [1, 2, 3]

        def decode(self, ids, skip_special=False):
            return "x" * len(ids)

    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32")).eval()
    spy = Spy()
    backend = ChatBackend(model, spy, {"stop_ids": set()})
    reply = "".join(backend.reply("a" * 50_000, [], "s" * 50_000, temperature=99.0, top_p=5.0, max_new_tokens=10**6))
    assert spy.lengths == [MAX_MESSAGE_CHARS, MAX_MESSAGE_CHARS]
    assert len(reply) == backend.max_new_tokens == model.args.max_seq_len // 2  # max tokens clamped


def test_backend_on_the_batching_engine_answers_as_alone():
    """With an engine (`verse chat --ui --slots N`), concurrent replies decode in one batch and each equals the
    reply generated alone; a reply closed midway (Stop) frees its slot."""
    from verse.infer.engine import Engine

    tokenizer = verse.load_tokenizer("byte")
    torch.manual_seed(0)
    model = ReasoningLLM(ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tokenizer.vocab_size)).eval()
    alone = ChatBackend(model, tokenizer, {"seed": 5})
    asks = [(f"question {i}", "", 0.0 if i % 2 else 0.9, 0.9, 6 + i) for i in range(4)]
    want = ["".join(alone.reply(m, [], s, t, p, n)) for m, s, t, p, n in asks]
    engine = Engine(model, tokenizer, slots=3, max_len=128).start()
    try:
        batched = ChatBackend(model, tokenizer, {"seed": 5}, engine)
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(lambda a: "".join(batched.reply(a[0], [], *a[1:])), asks))
        assert got == want
        reply = batched.reply("a long one", [], "", 0.0, 1.0, 60)
        next(reply)
        assert engine.free_slots == 2
        reply.close()
        deadline = time.time() + 10
        while engine.free_slots != 3:
            assert time.time() < deadline, "a closed reply kept its slot"
            time.sleep(0.01)
    finally:
        engine.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`verse chat CKPT --ui` on loopback with a random byte-level model that never emits a stop token."""
    torch.manual_seed(0)
    tokenizer = verse.load_tokenizer("byte")
    args = ModelArgs.from_preset("tiny", dtype="float32", vocab_size=tokenizer.vocab_size, dim=256, n_layers=6,
                                 inter_dim=512, max_seq_len=2048)
    model = ReasoningLLM(args)
    with torch.no_grad():
        model.head.weight[256:] = 0  # special tokens (eos, <|im_end|>, ...) never win: replies run to max tokens
    ckpt = tmp_path_factory.mktemp("ui") / "model"
    model.save_pretrained(ckpt, tokenizer=tokenizer)
    port = _free_port()
    log = open(ckpt.parent / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "verse.cli", "chat", str(ckpt), "--ui", "--port", str(port),
                             "--max-new-tokens", "1000"], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, (ckpt.parent / "server.log").read_text()
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            time.sleep(1)
    else:
        pytest.fail("verse chat --ui did not start in 180 s")
    yield url, proc
    proc.terminate()
    proc.wait(timeout=30)
    log.close()


def _bot_text(page) -> str:
    bots = page.locator("#chatbot [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


@pytest.mark.slow
def test_browser_streams_stops_and_resets(server):
    playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (UI tests)")
    assert Path(CHROMIUM).exists(), "apt-get install -y chromium"
    url, proc = server
    ARTIFACTS.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
            "--disable-sync"])
        page = browser.new_page()
        page.goto(url)
        page.fill("#message textarea", "Hello, Verse!")
        page.click("#send")
        page.locator("#chatbot [data-testid='user']").filter(has_text="Hello, Verse!").wait_for(timeout=30_000)
        lengths = []
        deadline = time.time() + 60
        while len(set(lengths) - {0}) < 3 and time.time() < deadline:  # the reply grows while we watch
            lengths.append(len(_bot_text(page)))
            page.wait_for_timeout(100)
        assert len(set(lengths) - {0}) >= 3, f"no streaming seen: {lengths}"
        page.click("#stop")
        page.wait_for_timeout(1500)
        stopped = _bot_text(page)
        page.wait_for_timeout(2000)
        assert _bot_text(page) == stopped and stopped  # stopped mid-reply (1000 tokens take far longer)
        page.screenshot(path=str(ARTIFACTS / "ui_chat.png"), full_page=True)
        page.click("#reset")
        page.wait_for_timeout(1000)
        assert page.locator("#chatbot [data-testid='bot']").count() == 0
        assert page.locator("#chatbot [data-testid='user']").count() == 0
        browser.close()
    assert proc.poll() is None


@pytest.mark.slow
def test_twenty_concurrent_api_requests_all_answered(server):
    from gradio_client import Client

    url, proc = server
    client = Client(url, verbose=False)
    jobs = [client.submit(f"question {i}", "", 0.0, 1.0, 8, api_name="/chat") for i in range(20)]
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda job: job.result(timeout=300), jobs))
    assert len(answers) == 20 and all(isinstance(a, str) and a for a in answers)
    # greedy: the same question gets the same answer whatever the queue order
    assert client.predict("question 3", "", 0.0, 1.0, 8, api_name="/chat") == answers[3]
    assert proc.poll() is None
    assert urllib.request.urlopen(url, timeout=10).status == 200
