"""Chat completions through real HTTP against the real vLLM engine: plain, streaming, n, the openai SDK, storage on
both databases, version pinning with a LoRA adapter, client disconnects, auth, metrics, and every bad input."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.serverkit import AppServer
from tests.store_reads import count_completions, get_completion

HELLO = [{"role": "user", "content": "How do I bake bread at home?"}]


def chat(srv: AppServer, **body: Any) -> httpx.Response:
    body.setdefault("model", "alignd")
    body.setdefault("messages", HELLO)
    return httpx.post(f"{srv.url}/v1/chat/completions", json=body, timeout=120)


def sse_events(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stored(srv: AppServer, completion_id: str) -> Any:
    return srv.loop.run(get_completion(srv.state.store, completion_id))


def count_stored(srv: AppServer) -> int:
    return srv.loop.run(count_completions(srv.state.store))


# --- happy paths -------------------------------------------------------------------------------------------------


def test_plain_chat_is_answered_and_stored(server: AppServer) -> None:
    r = chat(server, max_tokens=24, temperature=0.7, user="alice", metadata={"session": "s1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["system_fingerprint"] == "policy-0"
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["message"]["content"]
    assert choice["finish_reason"] in {"stop", "length"}
    usage = body["usage"]
    assert usage["completion_tokens"] <= 24
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    rec = stored(server, body["id"])
    assert rec is not None, "the completion must be committed before the response is sent"
    assert rec.policy_version == 0 and rec.user == "alice" and rec.metadata == {"session": "s1"}
    assert rec.messages[0]["content"] == HELLO[0]["content"]
    assert rec.params["max_tokens"] == 24 and rec.params["temperature"] == 0.7
    assert rec.choices[0].text == choice["message"]["content"]
    assert len(rec.choices[0].token_ids) == usage["completion_tokens"]
    assert rec.choices[0].finish_reason == choice["finish_reason"]
    assert rec.latency_ms > 0


def test_streaming_chat_streams_deltas_and_stores_before_done(server: AppServer) -> None:
    body = {"model": "alignd", "messages": HELLO, "stream": True, "max_tokens": 32, "temperature": 0.8,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    contents = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    text = "".join(x for x in contents if x)
    assert len([x for x in contents if x]) > 1, "a stream must deliver the reply in several deltas"
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert finish in (["stop"], ["length"])
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] > 0
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    rec = stored(server, chunks[0]["id"])
    assert rec is not None and rec.stream and rec.choices[0].text == text
    assert len(rec.choices[0].token_ids) == usage["completion_tokens"]


def test_n_choices_plain_and_streaming(server: AppServer) -> None:
    r = chat(server, n=3, max_tokens=20, temperature=1.0, seed=7)
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert all(c["message"]["content"] for c in choices)
    rec = stored(server, r.json()["id"])
    assert [c.index for c in rec.choices] == [0, 1, 2]
    assert [c.text for c in rec.choices] == [c["message"]["content"] for c in choices]

    body = {"model": "alignd", "messages": HELLO, "stream": True, "n": 3, "max_tokens": 16, "temperature": 1.0}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=120) as resp:
        events = sse_events(resp)
    texts = {0: "", 1: "", 2: ""}
    for e in events[:-1]:
        for c in e["choices"]:
            texts[c["index"]] += c["delta"].get("content") or ""
    rec = stored(server, events[0]["id"])
    assert [c.text for c in rec.choices] == [texts[0], texts[1], texts[2]]


def test_openai_sdk_plain_stream_and_n(server: AppServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = client.chat.completions.create(model="alignd", messages=HELLO, max_tokens=16)
    assert completion.choices[0].message.content
    assert completion.system_fingerprint == "policy-0"

    pieces = []
    for chunk in client.chat.completions.create(model="alignd", messages=HELLO, max_tokens=16, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    assert "".join(pieces)

    many = client.chat.completions.create(model="alignd", messages=HELLO, max_tokens=8, n=3, temperature=0.9)
    assert len(many.choices) == 3
    models = [m.id for m in client.models.list()]
    assert "alignd" in models and "alignd@0" in models


def test_completions_are_stored_on_postgresql(pg_server: AppServer) -> None:
    r = chat(pg_server, max_tokens=12, n=2, temperature=0.9)
    assert r.status_code == 200, r.text
    rec = stored(pg_server, r.json()["id"])
    assert rec is not None and len(rec.choices) == 2
    assert "postgresql" in pg_server.state.store.url
    with httpx.stream("POST", f"{pg_server.url}/v1/chat/completions",
                      json={"model": "alignd", "messages": HELLO, "stream": True, "max_tokens": 8}, timeout=60) as s:
        events = sse_events(s)
    assert stored(pg_server, events[0]["id"]) is not None


# --- policy versions ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_adapter(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A PEFT LoRA adapter with non-zero random B matrices, so that it visibly changes the model's output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(demo_model_dir),
                           LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    return out


def test_pinned_version_answers_with_its_adapter(server: AppServer, random_adapter: Path) -> None:
    server.loop.run(server.state.engine.load_policy(1, random_adapter))
    try:
        greedy = {"max_tokens": 24, "temperature": 0}
        base = chat(server, model="alignd@0", **greedy).json()
        pinned = chat(server, model="alignd@1", **greedy).json()
        default = chat(server, **greedy).json()
        assert pinned["system_fingerprint"] == "policy-1"
        assert default["system_fingerprint"] == "policy-0"
        assert pinned["choices"][0]["message"]["content"] != base["choices"][0]["message"]["content"]
        assert default["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
        assert stored(server, pinned["id"]).policy_version == 1
        assert "alignd@1" in [m["id"] for m in httpx.get(f"{server.url}/v1/models").json()["data"]]
    finally:
        server.loop.run(server.state.engine.unload_policy(1))
    gone = chat(server, model="alignd@1", max_tokens=4)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_corrupt_adapter_is_refused_and_nothing_changes(server: AppServer, tmp_path: Path) -> None:
    from alignd.engine.vllm_engine import PolicyLoadError

    (tmp_path / "adapter_config.json").write_text("{not json")
    with pytest.raises(PolicyLoadError):
        server.loop.run(server.state.engine.load_policy(5, tmp_path))
    assert 5 not in server.state.engine.loaded_versions
    assert chat(server, max_tokens=4).status_code == 200


# --- client disconnect -------------------------------------------------------------------------------------------


def _wait_idle(srv: AppServer, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if srv.state.engine.num_unfinished_requests() == 0:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts_engine_request(server: AppServer, stream: bool) -> None:
    assert _wait_idle(server)
    before = count_stored(server)
    body = {"model": "alignd", "messages": HELLO, "stream": stream, "max_tokens": 480, "ignore_eos": True}
    client = httpx.Client(timeout=60)
    if stream:
        with client.stream("POST", f"{server.url}/v1/chat/completions", json=body) as r:
            for line in r.iter_lines():  # the first content delta: the engine is generating now
                if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["delta"].get("content"):
                    completion_id = json.loads(line[6:])["id"]
                    break
    else:
        # Eight long choices: far more than the client's one second, however fast the machine is (one choice of
        # 480 tokens of the demo model could finish within it on an idle machine).
        body = {**body, "n": 8, "temperature": 1.0}
        with pytest.raises(httpx.ReadTimeout):
            client.post(f"{server.url}/v1/chat/completions", json=body, timeout=1.0)
        completion_id = None
    client.close()
    assert _wait_idle(server), "the engine kept generating for a client that was gone"
    # The partial completion is stored in the background; wait for it so later tests count a settled store.
    deadline = time.monotonic() + 10
    while count_stored(server) == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert count_stored(server) == before + 1
    if completion_id:
        rec = stored(server, completion_id)
        assert rec is not None and rec.choices[0].finish_reason == "abort"
        assert len(rec.choices[0].token_ids) < 480


# --- bad input ---------------------------------------------------------------------------------------------------

BAD_REQUESTS: list[tuple[str, Any, int, str | None]] = [
    # (case, body (bytes or dict), status, param)
    ("malformed json", b'{"model": "alignd", "messages": [', 400, None),
    ("not an object", b"[1, 2, 3]", 400, None),
    ("empty body", b"", 400, None),
    ("messages missing", {"model": "alignd"}, 400, "messages"),
    ("messages empty", {"model": "alignd", "messages": []}, 400, "messages"),
    ("messages wrong type", {"model": "alignd", "messages": "hi"}, 400, "messages"),
    ("unknown role", {"model": "alignd", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("content wrong type", {"model": "alignd", "messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content"),
    ("model missing", {"messages": HELLO}, 400, "model"),
    ("n zero", {"model": "alignd", "messages": HELLO, "n": 0}, 400, "n"),
    ("n above cap", {"model": "alignd", "messages": HELLO, "n": 17, "temperature": 1}, 400, "n"),
    ("n wrong type", {"model": "alignd", "messages": HELLO, "n": "3"}, 400, "n"),
    ("n>1 greedy", {"model": "alignd", "messages": HELLO, "n": 2, "temperature": 0}, 400, "temperature"),
    ("max_tokens beyond context", {"model": "alignd", "messages": HELLO, "max_tokens": 100000}, 400, "max_tokens"),
    ("max_completion_tokens beyond context", {"model": "alignd", "messages": HELLO,
                                              "max_completion_tokens": 5000}, 400, "max_completion_tokens"),
    ("max_tokens zero", {"model": "alignd", "messages": HELLO, "max_tokens": 0}, 400, "max_tokens"),
    ("prompt beyond context", {"model": "alignd", "messages": [{"role": "user", "content": "bread " * 2000}]},
     400, "messages"),
    ("temperature too high", {"model": "alignd", "messages": HELLO, "temperature": 2.5}, 400, "temperature"),
    ("temperature negative", {"model": "alignd", "messages": HELLO, "temperature": -0.1}, 400, "temperature"),
    ("top_p zero", {"model": "alignd", "messages": HELLO, "top_p": 0}, 400, "top_p"),
    ("top_p above one", {"model": "alignd", "messages": HELLO, "top_p": 1.5}, 400, "top_p"),
    ("unknown model", {"model": "gpt-4", "messages": HELLO}, 404, "model"),
    ("unloaded version", {"model": "alignd@99", "messages": HELLO}, 404, "model"),
    ("stream wrong type", {"model": "alignd", "messages": HELLO, "stream": "yes"}, 400, "stream"),
    ("stop wrong type", {"model": "alignd", "messages": HELLO, "stop": 3}, 400, "stop"),
    ("logprobs unsupported", {"model": "alignd", "messages": HELLO, "logprobs": True}, 400, "logprobs"),
    ("tools unsupported", {"model": "alignd", "messages": HELLO, "tools": [{"type": "function"}]}, 400, "tools"),
    ("json mode unsupported", {"model": "alignd", "messages": HELLO, "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("body too large", {"model": "alignd", "messages": [{"role": "user", "content": "x" * 2_000_000}]}, 413, None),
]


@pytest.mark.parametrize(("case", "body", "status", "param"), BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_is_a_clear_4xx_and_changes_nothing(server: AppServer, case: str, body: Any, status: int,
                                                      param: str | None) -> None:
    before = count_stored(server)
    engine_calls = server.state.metrics.engine_requests._value.get()
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{server.url}/v1/chat/completions", content=content,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert count_stored(server) == before
    assert server.state.metrics.engine_requests._value.get() == engine_calls


def test_unknown_route_and_method_are_openai_shaped(server: AppServer) -> None:
    r = httpx.get(f"{server.url}/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = httpx.get(f"{server.url}/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


# --- access ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(make_server: Any) -> AppServer:
    return make_server(api_keys=["user-key-1", "user-key-2"], admin_keys=["admin-key"])


@pytest.mark.parametrize(("header", "status"), [
    (None, 401), ("Bearer wrong", 401), ("Basic dXNlcjpwYXNz", 401), ("Bearer user-key-2", 200),
    ("Bearer admin-key", 200),
])
def test_api_keys_guard_the_client_api(keyed_server: AppServer, header: str | None, status: int) -> None:
    headers = {"authorization": header} if header else {}
    r = httpx.post(f"{keyed_server.url}/v1/chat/completions", headers=headers, timeout=60,
                   json={"model": "alignd", "messages": HELLO, "max_tokens": 4})
    assert r.status_code == status, r.text
    if status == 401:
        assert r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(f"{keyed_server.url}/health").status_code == 200


def test_admin_guard_tells_api_key_from_admin_key(keyed_server: AppServer) -> None:
    from alignd.auth import authorize_admin
    from alignd.errors import Forbidden, Unauthorized

    keys = keyed_server.state.keys
    assert keyed_server.loop.run(authorize_admin(keys, "admin-key")).role == "admin"
    for token, error in (("user-key-1", Forbidden), ("nope", Unauthorized), (None, Unauthorized)):
        with pytest.raises(error):
            keyed_server.loop.run(authorize_admin(keys, token))


def test_openai_sdk_with_api_key(keyed_server: AppServer) -> None:
    good = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="user-key-1", max_retries=0)
    assert good.chat.completions.create(model="alignd", messages=HELLO, max_tokens=4).choices
    bad = openai.OpenAI(base_url=f"{keyed_server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="alignd", messages=HELLO, max_tokens=4)


# --- health and metrics ------------------------------------------------------------------------------------------


def test_health_ready_and_metrics_after_traffic(server: AppServer) -> None:
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    ready = httpx.get(f"{server.url}/ready").json()
    assert ready["status"] == "ready" and ready["policy_version"] == 0
    chat(server, max_tokens=8)
    chat(server, model="nope")
    text = httpx.get(f"{server.url}/metrics").text
    samples = {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
               if line and not line.startswith("#")}
    ok = 'alignd_requests_total{method="POST",route="/v1/chat/completions",status="200"}'
    missing = 'alignd_requests_total{method="POST",route="/v1/chat/completions",status="404"}'
    assert samples[ok] >= 1 and samples[missing] >= 1
    assert samples["alignd_time_to_first_token_seconds_count"] >= 1
    assert samples['alignd_request_latency_seconds_count{route="/v1/chat/completions"}'] >= 2
    assert samples["alignd_prompt_tokens_total"] > 0 and samples["alignd_completion_tokens_total"] > 0
    assert samples["alignd_promoted_policy_version"] == 0
    assert "alignd_requests_in_flight" in samples
    assert any(name.startswith("vllm:") for name in samples), "vLLM's own metrics must be on the same endpoint"
