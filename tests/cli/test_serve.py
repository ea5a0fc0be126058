"""The OpenAI-compatible server (jpaged.serve) over real loopback HTTP, driven
by the official openai client, on the tiny random Llama: one engine and one
server for the module; the expected outputs come from LLM.generate / chat on
the same engine, run before the server takes it over."""
import asyncio
import importlib.util
import json
import pathlib
import subprocess
import sys
import threading
import time
import types

import httpx2
import openai
import pytest

import models
from jpaged import LLM, SamplingParams
from jpaged.outputs import CompletionOutput, RequestOutput
from jpaged.serve import OpenAIServer, ServerConfig, ServerThread, parse_args
from jpaged.stats import EngineStats
from tiny import ENGINE, ENGINE_FLAGS, LLAMA, tiny_tokenizer

REPO = pathlib.Path(__file__).resolve().parents[2]
MODEL, KEY = "tiny", "test-key"
MAX_QUEUED = 64  # beyond ENGINE's max_num_seqs (8): 72 requests at once, then 503
PROMPTS = [f"q{i}: " + "abcdefghij"[: i % 10] + " paging" * (i % 3) for i in range(64)]
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
GREEDY = dict(temperature=0.0, max_tokens=12)


@pytest.fixture(scope="module")
def llm():
    m = models.random_model(LLAMA, dtype="float32", seed=1)
    m.tokenizer = tiny_tokenizer()
    return LLM(m, use_tqdm_warmup=False, num_gpu_blocks=200, **ENGINE)


@pytest.fixture(scope="module")
def ref(llm):
    """Expected outputs, computed before the server owns the engine."""
    gen = lambda prompts, **kw: llm.generate(prompts, SamplingParams(**kw), use_tqdm=False)
    r = {"greedy": gen(PROMPTS, **GREEDY),
         "chat": llm.chat(CHAT, SamplingParams(**GREEDY), use_tqdm=False)[0],
         "n2": gen(PROMPTS[5], n=2, temperature=0.8, seed=7, max_tokens=10)[0],
         "logprobs": gen(PROMPTS[3], logprobs=2, **GREEDY)[0]}
    # A stop string: a printable character that an output holds after a few others.
    r["stop_at"], r["stop_str"] = next(
        (k, ch) for k, o in enumerate(r["greedy"]) for i, ch in enumerate(o.outputs[0].text)
        if i >= 2 and ch.isprintable() and ch != "\ufffd" and ch not in o.outputs[0].text[:i])
    r["stop"] = gen(PROMPTS[r["stop_at"]], stop=[r["stop_str"]], **GREEDY)[0]
    return r


class Handle:
    def __init__(self, llm):
        config = ServerConfig(port=0, served_model_name=MODEL, api_key=KEY,
                              max_queued_requests=MAX_QUEUED, shutdown_timeout=3.0)
        self.server = OpenAIServer(llm, config)
        self.thread = ServerThread(self.server)
        self.url = self.thread.__enter__()
        self.running = True

    def stop(self):
        if self.running:
            self.running = False
            self.thread.__exit__(None, None, None)

    def client(self, timeout=60):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0,
                             timeout=timeout)

    def aclient(self, timeout=60):
        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0,
                                  timeout=timeout)

    def post(self, path, body, timeout=30):
        return httpx2.post(self.url + path, content=body if isinstance(body, bytes) else
                           json.dumps(body), headers={"Authorization": f"Bearer {KEY}"},
                           timeout=timeout)

    def metrics(self) -> dict:
        text = httpx2.get(self.url + "/metrics").text
        return {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
                if line.startswith("jpaged:")}

    def wait_idle(self, timeout=30.0) -> dict:
        """The metrics once no request is left and every block is free."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["jpaged:num_requests_unfinished"] == 0 and m["jpaged:num_requests_running"] == 0
                    and m["jpaged:num_free_gpu_blocks"] == m["jpaged:num_total_gpu_blocks"]):
                assert 0 <= m["jpaged:num_cached_gpu_blocks"] <= m["jpaged:num_free_gpu_blocks"]
                assert m["jpaged:num_free_cpu_blocks"] >= 0
                return m
            assert time.monotonic() < deadline, f"the server did not go idle: {m}"
            time.sleep(0.02)


@pytest.fixture(scope="module")
def srv(llm, ref):
    h = Handle(llm)
    yield h
    h.stop()


@pytest.fixture
def slow_engine(llm, monkeypatch):
    """Each engine step waits for `gate` (when set), then takes `per_token`
    seconds per token it generated (whatever the engine's tokens per step)."""
    eng, real_step = llm.engine, llm.engine.step
    state = dict(per_token=0.02, gate=None)

    def step():
        if state["gate"] is not None:
            state["gate"].wait(30)
        before = eng.stats.num_generated_tokens
        outputs = real_step()
        time.sleep(state["per_token"] * (eng.stats.num_generated_tokens - before))
        return outputs
    monkeypatch.setattr(eng, "step", step)
    return state


def wait_until(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def tokens(choice):
    return choice.model_extra["token_ids"]


# ------------------------------------------------------------------ basics
def test_models_health_metrics_and_api_key(srv):
    models_ = srv.client().models.list().data
    assert [m.id for m in models_] == [MODEL] and models_[0].model_extra["max_model_len"] == 64
    assert httpx2.get(srv.url + "/health").status_code == 200
    m = srv.metrics()
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc",
                 "num_preemptions_total", "generation_tokens_total",
                 "time_to_first_token_seconds_count", "time_per_output_token_seconds_count"):
        assert f"jpaged:{name}" in m
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError, match="API key"):
        c.completions.create(model=MODEL, prompt="hi", max_tokens=2)
    r = httpx2.post(srv.url + "/v1/completions", json=dict(prompt="hi"))
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_cli_flags_take_the_config_defaults():
    args = parse_args(["--model", "x.json", "--random-weights", *ENGINE_FLAGS])
    d = ServerConfig()
    assert (args.host, args.port, args.api_key, args.max_queued_requests) == (
        d.host, d.port, d.api_key, d.max_queued_requests)
    assert args.block_size == 4 and args.max_num_seqs == 8


def test_serving_scripts_reject_data_parallelism(capsys):
    spec = importlib.util.spec_from_file_location("bench_serving_flags",
                                                  REPO / "scripts" / "bench_serving.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for parse in (parse_args, bench.parse_args):
        assert parse(["--data-parallel-size", "1"]).data_parallel_size == 1
        with pytest.raises(SystemExit):
            parse(["--data-parallel-size", "2"])
        assert "--data-parallel-size 2: the server runs one engine replica" in \
            capsys.readouterr().err


def test_server_modules_import_without_jax():
    """The server's modules and the benchmark's client process start no jax
    (nor transformers): the engine is built by the caller."""
    code = ("import sys, jpaged.serve, jpaged.bench.client\n"
            "heavy = [m for m in sys.modules if m.split('.')[0] in "
            "('jax', 'jaxlib', 'flax', 'transformers')]\n"
            "assert not heavy, heavy\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ------------------------------------------------------------------ outputs
def test_completion_equals_generate_streamed_or_not(srv, ref, llm):
    c, want = srv.client(), ref["greedy"][0]
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], extra_body={"return_token_ids": True},
                             **GREEDY)
    ch = r.choices[0]
    assert ch.text == want.outputs[0].text and tokens(ch) == want.outputs[0].token_ids
    assert ch.finish_reason == want.outputs[0].finish_reason
    num_prompt = len(llm.get_tokenizer().encode(PROMPTS[0]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (
        num_prompt, len(want.outputs[0].token_ids), num_prompt + len(want.outputs[0].token_ids))
    chunks = list(c.completions.create(model=MODEL, prompt=PROMPTS[0], stream=True,
                                       stream_options={"include_usage": True}, **GREEDY))
    assert "".join(x.choices[0].text for x in chunks if x.choices) == ch.text
    assert [x.choices[0].finish_reason for x in chunks if x.choices][-1] == ch.finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    # The raw stream: server-sent events ending with [DONE].
    with httpx2.stream("POST", srv.url + "/v1/completions", json=dict(
            prompt=PROMPTS[0], stream=True, **GREEDY),
            headers={"Authorization": f"Bearer {KEY}"}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        lines = [x for x in resp.iter_lines() if x]
    assert all(x.startswith("data: ") for x in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["usage"]["completion_tokens"] == r.usage.completion_tokens


def test_chat_equals_llm_chat_streamed_or_not(srv, ref):
    c, want = srv.client(), ref["chat"].outputs[0]
    r = c.chat.completions.create(model=MODEL, messages=CHAT, **GREEDY)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ref["chat"].prompt_token_ids)
    chunks = list(c.chat.completions.create(model=MODEL, messages=CHAT, stream=True, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(x.choices[0].delta.content or "" for x in chunks) == want.text
    assert chunks[-1].choices[0].finish_reason == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    # max_completion_tokens is the newer name of max_tokens.
    r2 = c.chat.completions.create(model=MODEL, messages=CHAT, temperature=0,
                                   max_completion_tokens=12)
    assert r2.choices[0].message.content == want.text


def test_n_above_one(srv, ref):
    c, want = srv.client(), ref["n2"].outputs
    kw = dict(model=MODEL, prompt=PROMPTS[5], n=2, temperature=0.8, seed=7, max_tokens=10)
    r = c.completions.create(**kw)
    assert [x.index for x in r.choices] == [0, 1]
    assert [x.text for x in r.choices] == [o.text for o in want]
    streamed = ["", ""]
    for x in c.completions.create(stream=True, **kw):
        for ch in x.choices:
            streamed[ch.index] += ch.text
    assert streamed == [o.text for o in want]
    assert r.usage.completion_tokens == sum(len(o.token_ids) for o in want)
    # best_of > n cannot stream deltas: one chunk at the end, same choices.
    b = c.completions.create(model=MODEL, prompt=PROMPTS[5], n=1, best_of=2, temperature=0.8,
                             seed=7, max_tokens=10, stream=True)
    assert len([x for x in b if x.choices]) == 1


def test_batched_prompts_and_token_id_prompts(srv, ref, llm):
    c = srv.client()
    r = c.completions.create(model=MODEL, prompt=PROMPTS[:3], **GREEDY)
    assert [x.text for x in r.choices] == [o.outputs[0].text for o in ref["greedy"][:3]]
    ids = llm.get_tokenizer().encode(PROMPTS[2])
    r = c.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert r.choices[0].text == ref["greedy"][2].outputs[0].text
    r = c.completions.create(model=MODEL, prompt=PROMPTS[2], echo=True, **GREEDY)
    assert r.choices[0].text == PROMPTS[2] + ref["greedy"][2].outputs[0].text


def test_stop_strings(srv, ref):
    c, want = srv.client(), ref["stop"].outputs[0]
    full = ref["greedy"][ref["stop_at"]].outputs[0].text
    assert want.finish_reason == "stop"
    assert full.startswith(want.text) and len(want.text) < len(full)
    kw = dict(model=MODEL, prompt=PROMPTS[ref["stop_at"]], stop=[ref["stop_str"]], **GREEDY)
    r = c.completions.create(**kw)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "stop"
    assert r.choices[0].model_extra["stop_reason"] == ref["stop_str"]
    assert "".join(x.choices[0].text for x in c.completions.create(stream=True, **kw)) == want.text


def test_logprobs(srv, ref):
    c, want = srv.client(), ref["logprobs"].outputs[0]
    r = c.completions.create(model=MODEL, prompt=PROMPTS[3], logprobs=2, **GREEDY)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(want.token_ids) == len(lp.token_logprobs)
    expect = [float(getattr(e[t], "logprob", e[t])) for e, t in zip(want.logprobs, want.token_ids)]
    assert lp.token_logprobs == pytest.approx(expect, abs=1e-5)
    assert all(1 <= len(top) <= 3 for top in lp.top_logprobs)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    streamed = [v for x in c.completions.create(model=MODEL, prompt=PROMPTS[3], logprobs=2,
                                                stream=True, **GREEDY)
                for v in (x.choices[0].logprobs.token_logprobs if x.choices[0].logprobs else [])]
    assert streamed == pytest.approx(expect, abs=1e-5)
    chat = c.chat.completions.create(model=MODEL, messages=CHAT, logprobs=True, top_logprobs=2,
                                     **GREEDY)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
               and t.logprob <= 0 for t in content)


# ------------------------------------------------------------------ load
def test_64_concurrent_clients(srv, ref):
    async def one(client, i):
        kw = dict(model=MODEL, prompt=PROMPTS[i], extra_body={"return_token_ids": True}, **GREEDY)
        if i % 2:
            r = await client.completions.create(**kw)
            return r.choices[0].text, tokens(r.choices[0])
        text, ids = "", []
        async for x in await client.completions.create(stream=True, **kw):
            if x.choices:
                text += x.choices[0].text
                ids += tokens(x.choices[0])
        return text, ids

    async def main():
        client = srv.aclient(timeout=120)
        try:
            return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(64))), 120)
        finally:
            await client.close()
    before = srv.metrics()
    got = asyncio.run(main())
    assert got == [(o.outputs[0].text, o.outputs[0].token_ids) for o in ref["greedy"]]
    m = srv.wait_idle()
    count = "jpaged:e2e_request_latency_seconds_count"
    assert m[count] - before[count] == 64  # each answered once
    assert m["jpaged:request_aborted_total"] == before["jpaged:request_aborted_total"]


def test_full_queue_gets_503_and_the_rest_finish(srv, slow_engine):
    gate = slow_engine["gate"] = threading.Event()
    limit = 8 + MAX_QUEUED

    async def main():
        client = srv.aclient(timeout=60)
        try:
            held = [asyncio.ensure_future(client.completions.create(
                model=MODEL, prompt=PROMPTS[i % 64], temperature=0, max_tokens=2))
                for i in range(limit)]
            deadline = time.monotonic() + 30
            while srv.server.engine.num_unfinished < limit:
                assert time.monotonic() < deadline, "the requests were not admitted"
                await asyncio.sleep(0.01)
            with pytest.raises(openai.APIStatusError) as e:
                await client.completions.create(model=MODEL, prompt="one more", max_tokens=2)
            gate.set()
            done = await asyncio.wait_for(asyncio.gather(*held), 60)
            return e.value, done
        finally:
            gate.set()
            await client.close()
    err, done = asyncio.run(main())
    assert err.status_code == 503 and err.body["code"] == "queue_full"
    assert "retry later" in err.body["message"]
    assert len(done) == limit and all(r.choices[0].finish_reason for r in done)
    srv.wait_idle()


def test_disconnect_aborts_the_request(srv, ref, slow_engine):
    """A client that goes away mid-stream, while its request waits to be
    taken, or while a non-streamed request runs: each request is aborted
    (once), the others finish, every block is free again."""
    errors = 'jpaged:request_errors_total{status="500"}'
    m0 = srv.metrics()
    aborted = lambda: srv.server.engine.num_aborted - m0["jpaged:request_aborted_total"]
    c = srv.client()
    stream = c.completions.create(model=MODEL, prompt="go", max_tokens=50, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it), next(it)
    gate = slow_engine["gate"] = threading.Event()  # the engine stops stepping
    stream.close()
    wait_until(lambda: aborted() == 1)
    with pytest.raises(httpx2.ReadTimeout):  # it is never taken while the engine waits
        srv.post("/v1/completions", dict(prompt="go on", max_tokens=4), timeout=0.3)
    wait_until(lambda: aborted() == 2)
    other = {}
    t = threading.Thread(target=lambda: other.update(r=c.completions.create(
        model=MODEL, prompt=PROMPTS[0], **GREEDY)))
    t.start()
    gate.set()
    slow_engine["per_token"] = 0.05
    with pytest.raises(httpx2.ReadTimeout):  # 50 tokens take 2.5 s
        srv.post("/v1/completions", dict(prompt="go on", max_tokens=50, ignore_eos=True),
                 timeout=0.5)
    wait_until(lambda: aborted() == 3)
    t.join(60)
    assert other["r"].choices[0].text == ref["greedy"][0].outputs[0].text
    m = srv.wait_idle()
    assert m["jpaged:request_aborted_total"] - m0["jpaged:request_aborted_total"] == 3
    assert m.get(errors, 0) == m0.get(errors, 0)  # an abort is not an internal error


# ------------------------------------------------------------------ errors
BAD = [  # (path, body, status, what the message says)
    ("/v1/completions", b"{not json", 400, "not valid JSON"),
    ("/v1/completions", [1, 2], 400, "JSON object"),
    ("/v1/completions", {"max_tokens": 4}, 400, "prompt: this field is required"),
    ("/v1/chat/completions", {"max_tokens": 4}, 400, "messages: this field is required"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "n": True}, 400, "n: Input should be a valid integer"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "top_p": 2.0}, 400, "top_p must be in (0.0, 1.0]"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens must be"),
    ("/v1/completions", {"prompt": "hi", "temperature": 1e999}, 400, "temperature must be"),
    ("/v1/completions", {"prompt": "hi", "best_of": 1, "n": 2}, 400, "best_of must be >= n"),
    ("/v1/completions", {"prompt": "hi", "n": 9}, 400, "at most 8 sequences"),
    ("/v1/completions", {"prompt": "hi", "stop": [1]}, 400, "stop: must be a string"),
    ("/v1/completions", {"prompt": "hi", "max_tokenz": 3}, 400, "unrecognized request argument"),
    ("/v1/completions", {"prompt": []}, 400, "prompt: must be a string"),
    ("/v1/completions", {"prompt": [1, "a"]}, 400, "prompt: must be a string"),
    ("/v1/completions", {"prompt": [5, 999]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": ["ok", [1, 2]]}, 400, "prompt: must be"),
    ("/v1/completions", {"prompt": "x" * 60, "max_tokens": 10}, 400, "maximum context length"),
    ("/v1/completions", {"prompt": "x" * 70}, 400, "maximum context length is 64"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 1.0}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "", "max_tokens": 2}, 400, "empty"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-9"}, 400, "does not exist"),
    ("/v1/chat/completions", {"messages": []}, 400, "at least one message"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "only text content"),
    ("/v1/chat/completions", {"messages": CHAT, "tools": [{"type": "function"}]}, 400, "tools"),
    ("/v1/chat/completions", {"messages": CHAT, "top_logprobs": 2}, 400, "needs logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 70}]}, 400,
     "maximum context length"),
    ("/v1/nope", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path,body,status,says", BAD,
                         ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_request_gets_an_error_body(srv, path, body, status, says):
    r = srv.post(path, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert says in err["message"] and set(err) == {"message", "type", "param", "code"}


def test_bad_requests_leave_the_server_serving(srv, ref):
    c = srv.client()
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.completions.create(model=MODEL, prompt="hi", temperature=-1)
    with pytest.raises(openai.BadRequestError, match="does not exist"):
        c.completions.create(model="gpt-9", prompt="hi")
    r = c.completions.create(model=MODEL, prompt=PROMPTS[0], **GREEDY)
    assert r.choices[0].text == ref["greedy"][0].outputs[0].text
    m = srv.wait_idle()
    assert m['jpaged:request_errors_total{status="400"}'] >= len(BAD) - 2


class FakeEngine:
    """An engine that fails on demand, by the prompt's first token id: 1
    add_request raises a bug, 2 the request's step fails (error output), 3
    step() itself raises (the loop dies); others finish with one token."""

    def __init__(self):
        ns = types.SimpleNamespace
        self.config = ns(model="fake", max_model_len=64, max_num_seqs=8)
        self.model = ns(config=ns(vocab_size=320))
        self.scheduler = ns(running=[], waiting=[], swapped=[])
        self.block_manager = ns(get_num_free_gpu_blocks=lambda: 9,
                                get_num_total_gpu_blocks=lambda: 9,
                                get_num_free_cpu_blocks=lambda: 4,
                                gpu_allocator=ns(get_num_cached_blocks=lambda: 0))
        self.stats = EngineStats()
        self.requests = {}

    def add_request(self, rid, prompt, sp, prompt_token_ids):
        if prompt_token_ids[0] == 1:
            raise RuntimeError("a bug in add_request")
        self.requests[rid] = prompt_token_ids

    def has_unfinished_requests(self):
        return bool(self.requests)

    def abort_request(self, ids):
        for rid in [ids] if isinstance(ids, str) else ids:
            self.requests.pop(rid, None)

    def step(self):
        outs = []
        for rid, ids in list(self.requests.items()):
            if ids[0] == 3:
                raise RuntimeError("a bug in step")
            del self.requests[rid]
            if ids[0] == 2:
                outs.append(RequestOutput.from_error(rid, None, ids, "the step failed"))
            else:
                outs.append(RequestOutput(rid, None, ids, None, [CompletionOutput(
                    0, "", [5], finish_reason="length")], True))
        return outs


def test_engine_failures_reach_the_client():
    llm = types.SimpleNamespace(engine=FakeEngine(), get_tokenizer=lambda: None)
    server = OpenAIServer(llm, ServerConfig(port=0))
    with ServerThread(server) as url:
        post = lambda ids, **kw: httpx2.post(url + "/v1/completions", timeout=30,
                                             json=dict(prompt=ids, max_tokens=1, **kw))
        assert post([4]).json()["usage"]["completion_tokens"] == 1
        r = post([1])
        assert r.status_code == 500 and "a bug in add_request" in r.json()["error"]["message"]
        r = post([2])
        assert r.status_code == 500 and r.json()["error"]["message"] == "the step failed"
        lines = [x for x in post([2], stream=True).text.splitlines() if x]
        assert json.loads(lines[0][6:])["error"]["message"] == "the step failed"
        assert lines[-1] == "data: [DONE]"
        assert post([4]).status_code == 200  # still serving
        r = post([3])
        assert r.status_code == 503 and "the engine loop died" in r.json()["error"]["message"]
        assert httpx2.get(url + "/health").status_code == 503
        assert post([4]).status_code == 503
        assert server.engine.num_unfinished == 0


# ------------------------------------------------------------------ benchmark
def test_bench_serving_script(tmp_path):
    (tmp_path / "tiny.json").write_text(json.dumps(LLAMA))
    spec = importlib.util.spec_from_file_location("bench_serving",
                                                  REPO / "scripts" / "bench_serving.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "serving.json"
    argv = ["--random-weights", "--model", str(tmp_path / "tiny.json"), *ENGINE_FLAGS,
            "--workload", "alpaca", "--num-requests", "6", "--request-rates", "inf,50",
            "--output", str(out)]
    mod.main(argv)
    res = json.loads(out.read_text())
    assert res["device"] and res["command"].startswith("python scripts/bench_serving.py")
    assert res["commit"] is None or len(res["commit"]) >= 40
    runs = res["runs"]
    assert [r["request_rate"] for r in runs] == ["inf", 50.0]
    for r in runs:
        assert r["num_completed"] == 6 and r["num_failed"] == 0 and r["tokens_match_generate"]
        for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            assert r[k]["p50"] <= r[k]["p90"] <= r[k]["p99"]
        assert r["output_tokens"] == res["generate"]["output_tokens"] > 0
    assert res["overhead"]["generate_over_server_throughput"] > 0
    assert res["engine"]["compiles_at_warmup"] > 0 and res["engine"]["warmup_seconds"] > 0
    assert res["engine"]["compiles_after_warmup"] == 0  # (the server's run and generate's)


# ------------------------------------------------------------------ shutdown (last)
def test_graceful_shutdown(srv, llm, ref, slow_engine):
    """Stopping the server: a request in flight that needs less than
    shutdown_timeout (3 s) finishes, a long stream is cut off and aborted,
    the engine loop stops, nothing hangs, and the engine is whole (every
    block free) and usable again."""
    # the long stream needs > 4 s; the short request ~1.9 s after the gate opens: its
    # steps commit the long stream's window in flight (8 tokens), then the step of
    # its prompt (2), then a window of 8 + its 5 (stop rules end it on the device)
    slow_engine["per_token"] = 0.07
    c = srv.client()
    stream = c.completions.create(model=MODEL, prompt="go", max_tokens=60, temperature=0,
                                  stream=True, extra_body={"ignore_eos": True})
    it = iter(stream)
    next(it)
    gate = slow_engine["gate"] = threading.Event()  # no step until the shutdown has begun
    got = {}
    short = threading.Thread(target=lambda: got.update(r=c.completions.create(
        model=MODEL, prompt=PROMPTS[0], temperature=0, max_tokens=6,
        extra_body={"return_token_ids": True})))
    short.start()
    wait_until(lambda: srv.server.engine.num_unfinished == 2)
    t0 = time.monotonic()
    stopping = threading.Thread(target=srv.stop)
    stopping.start()
    time.sleep(0.3)
    gate.set()
    stopping.join(30)
    assert not stopping.is_alive() and time.monotonic() - t0 < 15
    short.join(10)
    assert tokens(got["r"].choices[0]) == ref["greedy"][0].outputs[0].token_ids[:6]
    with pytest.raises(Exception):
        list(it)  # cut off
    assert not srv.server.engine.is_running and srv.server.engine.num_aborted >= 1
    eng = llm.engine
    assert not eng.has_unfinished_requests()
    bm = eng.block_manager
    assert bm.get_num_free_gpu_blocks() == bm.get_num_total_gpu_blocks()
    slow_engine["per_token"] = 0.0
    out = llm.generate([PROMPTS[0]], SamplingParams(**GREEDY), use_tqdm=False)[0]
    assert out.outputs[0].text == ref["greedy"][0].outputs[0].text
