"""The server real clients drive: the openai client completes, chats and streams; greedy
completions are megajax.generate's and transformers' tokens; prompts are scored as
transformers scores them; 8 concurrent clients get what each gets alone, and no program
compiles after warm-up; every bad input gets its status and the server serves on; Megatron-LM's
PUT /api still answers. One server (uvicorn in a thread) over a small random GPT-2 for all."""

import http.client
import json
import threading
import urllib.error
import urllib.request

import jax
import numpy as np
import openai
import pytest
import torch
from conftest import device_mesh, llama_config, make_hf_gpt2, start_server
from transformers import GPT2LMHeadModel

from megajax import engine, generate, serve
from megajax.data.tokenizer import GPT2Tokenizer
from megajax.sharded_model import ShardedModel

MAX_ROWS = 4  # on 2 x 2: rows of 2 or 4, so 8 clients also wait in the queue
PROMPTS = ["Hello, my name is", "The", "To be, or not to be, that is the question:"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="module")
def served(hf_dir):
    url, server = start_server(hf_dir, max_rows=MAX_ROWS, max_body_bytes=1 << 16)
    yield url, server
    server.engine.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return GPT2LMHeadModel.from_pretrained(hf_dir).eval()


def _post(url, body, method="POST"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_greedy_completions_equal_generate_and_transformers(served, client, hf_model):
    """Three prompts of unequal length in one request (rows decoded together), each the
    tokens megajax.generate decodes and transformers' generate(do_sample=False)."""
    _, server = served
    reply = client.completions.create(
        model="tiny-gpt2", prompt=PROMPTS, max_tokens=12, temperature=0, logprobs=1
    )
    tokenizer = server.tokenizer
    ids = [tokenizer.encode(p) for p in PROMPTS]
    expected = server.engine.generator(ids, new_tokens=12, temperature=0.0)
    for i, choice in enumerate(sorted(reply.choices, key=lambda c: c.index)):
        ours = [tokenizer.encode(t)[0] for t in choice.logprobs.tokens]  # one id per token text
        np.testing.assert_array_equal(ours, expected["tokens"][i])
        np.testing.assert_allclose(choice.logprobs.token_logprobs, expected["logprobs"][i],
                                   atol=2e-5)  # fmt: skip
        prompt = torch.tensor([ids[i]])
        theirs = hf_model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   max_new_tokens=12, do_sample=False, eos_token_id=None,
                                   pad_token_id=0)[0, len(ids[i]):]  # fmt: skip
        np.testing.assert_array_equal(ours, theirs.numpy())
        assert choice.text == tokenizer.decode(ours) and choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == sum(map(len, ids)) and reply.usage.completion_tokens == 36


def test_echo_scores_the_prompt_as_transformers_and_as_lm_eval_reads_it(served, hf_model):
    """lm-eval's log-likelihood request: token ids, max_tokens 1, echo, logprobs 1. The first
    token has no log-probability; the others are transformers' log-softmax; a token is the
    greedy one exactly when its value is its position's best."""
    url, server = served
    tokenizer = server.tokenizer
    # the last prompt fills the model's 128 positions: scored whole, its next token chosen
    ids = [[15496, 11, 616, 1438, 318, 1757], [464, 3290], list(range(1000, 1128))]
    status, reply = _post(f"{url}/v1/completions", {"model": "tiny-gpt2", "prompt": ids,
                          "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0,
                          "seed": 1234})  # fmt: skip
    assert status == 200, reply
    for prompt, choice in zip(ids, sorted(reply["choices"], key=lambda c: c["index"]),
                              strict=True):  # fmt: skip
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(prompt) + 1 and lp["token_logprobs"][0] is None
        assert lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt])).logits[0].double()
        logp = torch.log_softmax(logits, -1)
        theirs = logp[:-1].gather(-1, torch.tensor(prompt[1:])[:, None])[:, 0].numpy()
        np.testing.assert_allclose(lp["token_logprobs"][1:-1], theirs, atol=2e-5)
        greedy = (logp[:-1].argmax(-1) == torch.tensor(prompt[1:])).numpy()
        best = [max(top.values()) for top in lp["top_logprobs"][1:-1]]
        np.testing.assert_allclose(best, logp[:-1].max(-1).values.numpy(), atol=2e-5)
        assert [v == b for v, b in zip(lp["token_logprobs"][1:-1], best, strict=True)] == list(
            greedy
        )
        assert choice["text"].startswith(tokenizer.decode(prompt))
    assert reply["usage"]["prompt_tokens"] == 8 + 128


def test_openai_client_completes_chats_and_streams(served, client):
    assert [m.id for m in client.models.list().data] == ["tiny-gpt2"]
    assert _get(f"{served[0]}/health") == {"status": "ok"}
    messages = [{"role": "user", "content": "Say something."}]
    kw = dict(model="tiny-gpt2", messages=messages, max_tokens=8, temperature=0)
    reply = client.chat.completions.create(**kw)
    message = reply.choices[0].message
    assert message.role == "assistant" and message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == message.content
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-gpt2", prompt="Once", max_tokens=6, temperature=0, stream=True))  # fmt: skip
    alone = client.completions.create(model="tiny-gpt2", prompt="Once", max_tokens=6,
                                      temperature=0)  # fmt: skip
    assert text == alone.choices[0].text


def test_chat_samples_n_choices_with_their_logprobs_streamed_or_not(client):
    """Two seeded choices of a chat, whole and streamed (the choices interleaved by index),
    each token with its log-probability and its 3 best alternatives."""
    kw = dict(model="tiny-gpt2", messages=[{"role": "user", "content": "Hi."}], max_tokens=6,
              temperature=1.0, seed=7, n=2)  # fmt: skip
    reply = client.chat.completions.create(**kw, logprobs=True, top_logprobs=3)
    texts = [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]
    assert len(texts) == 2 and texts[0] != texts[1]  # each choice its own key
    for choice in reply.choices:
        content = choice.logprobs.content
        assert "".join(t.token for t in content) == choice.message.content
        for token in content:
            assert len(token.top_logprobs) == 3 and token.logprob <= 0
            assert token.top_logprobs[0].logprob >= token.logprob  # the best is first
    streamed = ["", ""]
    for chunk in client.chat.completions.create(**kw, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts
    assert reply.usage.completion_tokens == sum(len(c.logprobs.content) for c in reply.choices)


def _get(url):
    with urllib.request.urlopen(url, timeout=60) as response:
        return json.loads(response.read())


def test_eight_concurrent_clients_each_get_their_answer_alone_and_nothing_compiles(served):
    """Greedy and seeded sampling, n of 2, unequal prompts and lengths. The model thread
    held until all 8 wait in the queue: 4 rows decode together, the rest join the running
    batch as rows free up, each leaving as it finishes."""
    url, server = served
    eng, gate = server.engine, threading.Event()
    requests = [
        {"prompt": PROMPTS[i % 3] * (1 + i % 2), "max_tokens": 4 + 3 * i,
         "temperature": 0 if i % 2 else 0.9, "seed": i, "top_k": 40 * (i % 3), "n": 1 + (i == 4)}
        for i in range(8)
    ]  # fmt: skip
    compiled = eng.compiled
    alone = [_post(f"{url}/v1/completions", r) for r in requests]
    together = [None] * 8

    def client(i):
        together[i] = _post(f"{url}/v1/completions", requests[i])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    eng.submit(gate.wait)
    while not eng.queue.empty():  # the model thread took the gate
        threading.Event().wait(0.01)
    eng.busiest = eng.joined_running = 0
    for t in threads:
        t.start()
    while eng.queue.qsize() < 8:
        threading.Event().wait(0.01)
    gate.set()
    for t in threads:
        t.join()
    assert eng.busiest == MAX_ROWS and eng.joined_running > 0
    for (s1, a), (s2, b) in zip(alone, together, strict=True):
        assert s1 == s2 == 200, (a, b)
        assert [c["text"] for c in a["choices"]] == [c["text"] for c in b["choices"]]
        assert a["usage"] == b["usage"]
    assert server.engine.compiled == compiled  # everything came from the warmed-up buckets
    assert len(server.engine.programs) == 2 * 4 + 2 + 2  # prefills, decodes, regroupings


def test_stop_strings_and_end_of_text_end_a_completion(served, client):
    url, server = served
    full = client.completions.create(model="tiny-gpt2", prompt="The", max_tokens=10,
                                     temperature=0, logprobs=0)  # fmt: skip
    tokens = full.choices[0].logprobs.tokens
    stop = tokens[3].strip() or tokens[3]
    cut = client.completions.create(model="tiny-gpt2", prompt="The", max_tokens=10,
                                    temperature=0, stop=[stop, "never"])  # fmt: skip
    text = full.choices[0].text
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    # The end-of-text token: made a later token's id here, it ends the choice, unprinted.
    k = next(k for k in range(1, 10) if tokens[k] not in tokens[:k])
    ids, done = server.tokenizer.encode("The"), threading.Event()
    end = server.tokenizer.encode(tokens[k])[0]
    work = engine.Work(ids=ids, max_tokens=10, temperature=0.0, stop_ids=frozenset({end}),
                       notify=lambda c, _: c.finish_reason and done.set())  # fmt: skip
    server.engine.submit([work])
    assert done.wait(120)
    (choice,) = work.choices
    assert choice.finish_reason == "stop" and choice.tokens[-1] == end
    assert len(choice.tokens) == k + 1 and choice.text == "".join(tokens[:k])


def test_a_llama_joining_the_running_batch_decodes_as_generate_does():
    """RoPE and grouped-query attention on 1 x 4 (the key/value weight split by rows): a
    request joining while another decodes gets megajax.generate's greedy tokens, and so does
    the one it joined; both wrap around the ring (a prompt sits behind the clock)."""
    sharded = ShardedModel(llama_config(rope_theta=100.0), device_mesh(1, 4))  # fast turns
    # Weights 10x their initial scale: attention, and so every key's position, decides tokens.
    params = jax.tree.map(lambda x: x * 10 if x.ndim > 1 else x, sharded.fresh_params())
    generator = generate.Generator(sharded, params)
    eng = engine.Engine(generator, GPT2Tokenizer("data/gpt2"), max_rows=2)
    prompts, new = [[5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]], 18
    second = engine.Work(ids=prompts[1], max_tokens=new, temperature=0.0, notify=lambda *_: 0)
    joined_after = []

    def notify(choice, _):  # in the engine's thread: the second joins at its next step
        if len(choice.tokens) >= 6 and not joined_after:
            joined_after.append(len(choice.tokens))
            eng.submit([second])

    first = engine.Work(ids=prompts[0], max_tokens=new, temperature=0.0, notify=notify)
    eng.submit([first])
    eng.run(until_idle=True)
    assert 6 <= joined_after[0] < new
    expected = generator(prompts, new_tokens=new, temperature=0.0)["tokens"]
    for work, tokens in zip((first, second), expected, strict=True):
        assert work.choices[0].tokens == tokens.tolist()


BAD = [
    (b"{not json", 400, "not JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({"prompt": "a", "tokens": 3}, 400, "unknown fields"),
    ({"prompt": "a", "temperature": 3}, 400, "temperature"),
    ({"prompt": "a", "top_p": 0}, 400, "top_p"),
    ({"prompt": "a", "n": MAX_ROWS + 1}, 400, "n: must be in"),
    ({"prompt": "a", "max_tokens": "3"}, 400, "an integer"),
    ({"prompt": "a", "max_tokens": 0}, 400, "needs echo"),
    ({"prompt": "a", "logprobs": 6}, 400, "logprobs"),
    ({"prompt": "a", "stream": True, "echo": True}, 400, "echo"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [[1, 2], "a"]}, 400, "prompt"),
    ({"prompt": [[50257]]}, 400, "token ids must be in"),
    ({"prompt": "a" + " a" * 125, "max_tokens": 8}, 400, "exceed the model's 128 positions"),
    ({"prompt": [list(range(129))], "max_tokens": 1, "echo": True}, 400, "129 tokens"),
    ({"prompt": "a", "model": "gpt-4"}, 404, "not served here"),
    (b"{" + b" " * (1 << 16) + b"}", 413, "over 65536 bytes"),
]


@pytest.mark.parametrize("body,status,message", BAD, ids=lambda x: str(x)[:30])
def test_a_bad_completion_gets_its_status_and_the_server_serves_on(served, body, status, message):
    url, _ = served
    got, reply = _post(f"{url}/v1/completions", body)
    assert got == status and message in reply["error"]["message"], reply
    assert set(reply["error"]) == {"message", "type", "param", "code"}
    assert _post(f"{url}/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200


def test_bad_chats_and_routes_get_openai_errors(served):
    url, _ = served
    cases = [
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "user"}]}, 400, "content"),
        ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 0}, 400, "max_tokens"),
        ({"messages": [{"role": "user", "content": "a"}], "top_logprobs": 9}, 400, "top_logp"),
    ]
    for body, status, message in cases:
        got, reply = _post(f"{url}/v1/chat/completions", body)
        assert got == status and message in reply["error"]["message"], reply
    got, reply = _post(f"{url}/v1/embeddings", {"input": "a"})
    assert got == 404 and "not served" in reply["error"]["message"]
    got, reply = _post(f"{url}/v1/completions", {"prompt": "a"}, method="PUT")
    assert got == 405 and reply["error"]["type"] == "invalid_request_error"


def test_a_full_queue_answers_503_and_the_queued_requests_are_served(served):
    """The model thread held by a job: the queue fills, one more request is refused."""
    url, server = served
    eng, gate, finished = server.engine, threading.Event(), []
    eng.submit(gate.wait)
    while not eng.queue.empty():  # the model thread took the gate
        threading.Event().wait(0.01)
    for _ in range(eng.queue.maxsize):
        work = engine.Work(ids=[464], max_tokens=2, notify=lambda c, _: c.finish_reason
                           and finished.append(c))  # fmt: skip
        eng.submit([work])
    for route, body in (("completions", {"prompt": "a"}), ("chat/completions", {"stream": True,
                        "messages": [{"role": "user", "content": "a"}]})):  # fmt: skip
        got, reply = _post(f"{url}/v1/{route}", {**body, "max_tokens": 2})
        assert got == 503 and reply["error"]["code"] == "queue_full"  # a stream too: no 200
    gate.set()
    while eng.queue.full():  # the model thread, let go, takes the queued requests in
        threading.Event().wait(0.01)
    assert _post(f"{url}/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
    assert len(finished) == eng.queue.maxsize


def test_a_request_past_its_time_gets_504_and_is_dropped(served):
    url, server = served
    eng, gate = server.engine, threading.Event()
    eng.submit(gate.wait)
    timeout, server.request_timeout = server.request_timeout, 0.5
    try:
        got, reply = _post(f"{url}/v1/completions", {"prompt": "a", "max_tokens": 2})
    finally:
        server.request_timeout = timeout
        gate.set()
    assert got == 504 and reply["error"]["code"] == "timeout"
    assert _post(f"{url}/v1/completions", {"prompt": "a", "max_tokens": 2})[0] == 200
    assert not eng._pending and not any(eng._row)  # the late request was never decoded


def test_a_client_that_leaves_a_stream_frees_its_row(served):
    """The model thread held after the first chunk, the client hangs up: its request is
    cancelled, and the engine drops the row at its next token instead of decoding on."""
    url, server = served
    eng, gate = server.engine, threading.Event()
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"prompt": "a", "max_tokens": 100, "temperature": 0, "stream": True}
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Content-Type": "application/json"})  # fmt: skip
    response = connection.getresponse()
    assert response.readline().startswith(b"data: {")  # the first text: decoding
    eng.submit(gate.wait)
    (choice,) = [c for c in eng._row if c is not None]
    connection.close()
    for _ in range(500):
        if choice.work.cancelled:
            break
        threading.Event().wait(0.01)
    gate.set()
    for _ in range(500):
        if choice.finish_reason:
            break
        threading.Event().wait(0.01)
    assert choice.finish_reason == "cancelled" and len(choice.tokens) < 100


# Megatron-LM's PUT /api, on the same server --------------------------------------------------


def test_megatron_api_round_trip(served):
    url, _ = served
    status, reply = _post(f"{url}/api", {"prompts": ["Hello, my", "The"], "tokens_to_generate":
                          4, "temperature": 0, "logprobs": True}, method="PUT")  # fmt: skip
    assert status == 200, reply
    assert reply["text"][0].startswith("Hello, my") and reply["text"][1].startswith("The")
    for text, segments, logprobs in zip(
        *(reply[k] for k in ("text", "segments", "logprobs")), strict=True
    ):
        assert "".join(segments) == text
        assert len(logprobs) == len(segments) - 1 and all(x <= 0 for x in logprobs)
    status, scored = _post(f"{url}/api", {"prompts": ["Hello, my"], "tokens_to_generate": 0,
                           "logprobs": True}, method="PUT")  # fmt: skip
    assert status == 200 and scored["text"] == ["Hello, my"]
    np.testing.assert_allclose(scored["logprobs"][0], reply["logprobs"][0][:2], atol=1e-5)


@pytest.mark.parametrize(
    "body,message",
    [
        (b"{not json", "not JSON"),
        ({"prompts": ["a"], "tokens": 3}, "unknown fields"),
        ({"prompts": []}, "non-empty list"),
        ({"prompts": ["a"], "temperature": 101}, "temperature"),
        ({"prompts": ["a"], "top_p": 1.5}, "top_p"),
        ({"prompts": ["a"], "top_k": -1}, "top_k"),
        ({"prompts": ["a"], "tokens_to_generate": "3"}, "integer"),
        ({"prompts": ["a"], "tokens_to_generate": 0}, "logprobs=true"),
        ({"prompts": ["a"] * 129}, "at most 128"),
        ({"prompts": ["a" + " a" * 130]}, "exceeds the model's 128 positions"),
        ({"prompts": ["a"], "tokens_to_generate": 5000}, "tokens_to_generate"),
    ],
)
def test_megatron_bad_request_is_400_and_it_keeps_serving(served, body, message):
    url, _ = served
    status, reply = _post(f"{url}/api", body, method="PUT")
    assert status == 400 and message in reply["message"], reply
    status, _ = _post(f"{url}/api", {"prompts": ["a"], "tokens_to_generate": 4}, method="PUT")
    assert status == 200


@pytest.mark.parametrize("method", ["POST", "GET", "DELETE"])
def test_a_method_other_than_put_on_api_gets_405_in_json_saying_to_use_put(served, method):
    body = json.dumps({"prompts": ["a"]}).encode() if method == "POST" else None
    request = urllib.request.Request(f"{served[0]}/api", data=body, method=method)
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 405 and caught.value.headers["Allow"] == "PUT"
    assert "PUT" in json.loads(caught.value.read())["message"]


def test_more_than_one_process_is_refused_in_one_line(monkeypatch, hf_dir, capsys):
    import jax

    monkeypatch.setattr(jax, "process_count", lambda: 2)
    argv = ["--hf_checkpoint", str(hf_dir), "--mesh", "data=2,model=4", "--step_timeout", "0"]
    assert serve.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the server runs in one process, not 2") and "\n" not in err
