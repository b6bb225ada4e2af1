"""`tunelab serve` on the tiny model, called with the official `openai` client over a real socket."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from openai.types.chat import ChatCompletionMessageParam
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from typer.testing import CliRunner

from tunelab.data.render import encode_prompt
from tunelab.errors import TunelabError
from tunelab.inference import chat_prompt
from tunelab.inference_server.app import create_app
from tunelab.inference_server.cli import parse_adapters, serve_app
from tunelab.serving.engines import TorchEngine, build_engine
from tunelab.serving.generation import Sampling, pick_token

QUESTION = "what is your name"
MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": QUESTION}]
MAX_TOKENS = 12


def make_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights: it visibly changes the tiny model's answers."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(out))
    return out


@dataclass
class Server:
    url: str
    engine: TorchEngine
    expected: dict[str, str]  # model id -> greedy answer to QUESTION from transformers' own generate

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="not-needed", max_retries=0, timeout=60)


def greedy_ids(model: Any, tokenizer: PreTrainedTokenizerBase, question: str, max_tokens: int) -> list[int]:
    ids = tokenizer(chat_prompt(tokenizer, [{"role": "user", "content": question}]), return_tensors="pt").input_ids
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    return [int(t) for t in out[0, ids.shape[1] :]]


def greedy_answer(model: Any, tokenizer: PreTrainedTokenizerBase, question: str, max_tokens: int) -> str:
    return str(tokenizer.decode(greedy_ids(model, tokenizer, question, max_tokens), skip_special_tokens=True))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("adapters")
    adapters = {name: make_adapter(tiny_llama_dir, folder / name, seed) for name, seed in (("alpha", 1), ("beta", 3))}
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    expected = {
        "tiny": greedy_answer(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tokenizer, QUESTION, MAX_TOKENS)
    }
    for name, path in adapters.items():
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), path)
        expected[name] = greedy_answer(model, tokenizer, QUESTION, MAX_TOKENS)
    assert len(set(expected.values())) == 3, "the adapters must change the answer for the test to mean anything"
    # One adapter kept in memory: concurrent requests for two adapters must still each get their own.
    engine = build_engine(str(tiny_llama_dir), adapters, max_adapters=1, name="tiny")
    assert isinstance(engine, TorchEngine)
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(engine), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        assert thread.is_alive(), "uvicorn did not start"
        threading.Event().wait(0.05)
    yield Server(f"http://127.0.0.1:{port}", engine, expected)
    uv.should_exit = True
    thread.join(timeout=10)


def test_models_lists_the_base_and_every_adapter(server: Server) -> None:
    client = server.client()
    assert [m.id for m in client.models.list()] == ["tiny", "alpha", "beta"]
    assert client.models.retrieve("beta").id == "beta"


def test_chat_answers_like_transformers_generate(server: Server) -> None:
    client = server.client()
    for model in ("tiny", "alpha", "beta"):
        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
        assert reply.choices[0].message.content == server.expected[model]
        assert reply.choices[0].finish_reason == "length"
        assert reply.usage is not None and reply.usage.completion_tokens == MAX_TOKENS
        assert reply.model == model


def test_streaming_sends_the_same_answer_in_chunks(server: Server) -> None:
    stream = server.client().chat.completions.create(
        model="alpha",
        messages=MESSAGES,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == server.expected["alpha"]
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == MAX_TOKENS


def test_concurrent_requests_for_different_adapters_get_their_own_answers(server: Server) -> None:
    client = server.client()
    models = ["alpha", "beta", "tiny", "beta", "alpha", "beta"]

    def ask(model: str) -> str:
        if model == "beta":  # mix streaming and non-streaming requests in flight together
            stream = client.chat.completions.create(
                model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stream=True
            )
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
        return str(reply.choices[0].message.content)

    with ThreadPoolExecutor(max_workers=len(models)) as pool:
        answers = list(pool.map(ask, models))
    assert answers == [server.expected[m] for m in models]
    registry = server.engine.registry
    assert len(registry.loaded) == 1 and all(users == 0 for users in registry.loaded.values())


def test_lru_keeps_a_bounded_number_of_adapters(server: Server) -> None:
    client, registry = server.client(), server.engine.registry
    for model in ("alpha", "alpha", "beta", "beta", "alpha"):
        client.completions.create(model=model, prompt="hello", max_tokens=2, temperature=0)
        assert list(registry.loaded) == [model]
    loads = registry.loads
    client.completions.create(model="alpha", prompt="hello", max_tokens=2, temperature=0)
    assert registry.loads == loads  # still loaded: no reload


def test_completions_stop_string_ends_the_text_before_it(server: Server) -> None:
    client = server.client()
    full = client.completions.create(model="beta", prompt="The weather", max_tokens=16, temperature=0)
    text = full.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert len(stop) == 2 and stop in text
    cut = client.completions.create(model="beta", prompt="The weather", max_tokens=16, temperature=0, stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.completions.create(
        model="beta", prompt="The weather", max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == cut.choices[0].text


def test_chat_stop_strings_streamed_or_not(server: Server, tiny_llama_dir: Path) -> None:
    tokenizer = server.engine.tokenizer
    ids = greedy_ids(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), tokenizer, QUESTION, MAX_TOKENS)
    text = str(tokenizer.decode(ids, skip_special_tokens=True))
    assert text == server.expected["tiny"]
    # A stop string that starts in one token and ends in the next: a stream that sent each token's text as soon
    # as it came would send the stop's first character before the next token completes the stop.
    ends = [len(prefix) for k in range(1, len(ids)) if text.startswith(prefix := tokenizer.decode(ids[:k]))]
    candidates = [text[end - 1 : end + 2] for end in ends if 2 <= end <= len(text) - 2]
    stop = next(c for c in candidates if c.isprintable() and text.index(c) + 1 in ends)
    never = text[-2:] + "\u2603"  # the answer ends with the start of this stop string, which never completes
    assert never not in text
    client = server.client()

    def ask(stops: list[str]) -> tuple[str, str | None, str, str | None]:
        reply = client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stop=stops
        )
        chunks = list(
            client.chat.completions.create(
                model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0, stop=stops, stream=True
            )
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return str(reply.choices[0].message.content), reply.choices[0].finish_reason, streamed, finish

    assert ask([never, stop]) == (text[: text.index(stop)], "stop", text[: text.index(stop)], "stop")
    assert ask([never]) == (text, "length", text, "length")


def test_seeded_sampling_repeats(server: Server) -> None:
    client = server.client()
    first, second = (
        client.completions.create(model="alpha", prompt="Once", max_tokens=10, temperature=1.0, top_p=0.9, seed=7)
        .choices[0]
        .text
        for _ in range(2)
    )
    assert first == second


def sampled(server: Server, **params: Any) -> str:
    reply = server.client().chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=MAX_TOKENS, **params)
    return str(reply.choices[0].message.content)


def test_different_seeds_sample_different_answers(server: Server) -> None:
    # The tiny model's next-token distribution is close to uniform over ~500 tokens: at temperature 1 two seeds
    # agreeing on 12 tokens, or a seed picking the greedy answer, would mean the seed or the sampling is ignored.
    answers = [sampled(server, temperature=1.0, top_p=1.0, seed=seed) for seed in (1, 2, 3, 4)]
    assert len(set(answers)) == len(answers), answers
    assert server.expected["alpha"] not in answers
    assert sampled(server, temperature=1.0, top_p=1.0, seed=3) == answers[2]


def test_temperature_zero_and_tiny_top_p_are_greedy(server: Server) -> None:
    greedy = server.expected["alpha"]  # transformers' own greedy generate
    for seed in (1, 2):
        assert sampled(server, temperature=0, top_p=1.0, seed=seed) == greedy
        assert sampled(server, temperature=0, top_p=0.5, seed=seed) == greedy
        # The nucleus of top_p=0.001 is the most likely token alone (its probability is at least 1/vocab).
        assert sampled(server, temperature=1.0, top_p=0.001, seed=seed) == greedy
        assert sampled(server, temperature=2.0, top_p=0.001, seed=seed) == greedy
    # Completions sample the same way: temperature 0 continues the raw text greedily.
    prompt = chat_prompt(server.engine.tokenizer, [{"role": "user", "content": QUESTION}])
    client = server.client()
    raw = client.completions.create(model="alpha", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, seed=9)
    assert raw.choices[0].text == greedy


def test_top_p_samples_only_from_the_nucleus() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    rng = torch.Generator().manual_seed(0)

    def draws(top_p: float, temperature: float = 1.0) -> set[int]:
        sampling = Sampling(max_tokens=1, temperature=temperature, top_p=top_p)
        return {pick_token(logits, [], sampling, rng) for _ in range(300)}

    assert draws(1.0) == {0, 1, 2, 3}
    assert draws(0.9) == {0, 1, 2}  # 0.5 + 0.3 < 0.9: the third token is needed to reach it
    assert draws(0.75) == {0, 1}  # 0.5 < 0.75 <= 0.5 + 0.3
    assert draws(0.4) == {0}
    assert draws(1.0, temperature=0) == {0}
    assert draws(1.0, temperature=0.02) == {0}  # (0.5 / 0.3) ** 50 > 1e11: the others all but vanish


def test_unknown_model_is_a_404_with_openai_error(server: Server) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        server.client().chat.completions.create(model="nope", messages=MESSAGES)
    assert info.value.status_code == 404
    error = info.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found" and "`nope` does not exist" in error["message"]
    assert error["type"] == "invalid_request_error" and error["param"] == "model"
    with pytest.raises(openai.NotFoundError):  # a stream fails before it starts, with the same error
        server.client().chat.completions.create(model="nope", messages=MESSAGES, stream=True)


def _assert_model_not_found(info: pytest.ExceptionInfo[openai.NotFoundError], model: str) -> None:
    assert info.value.status_code == 404
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found" and error["param"] == "model"
    assert error["message"] == f"The model `{model}` does not exist or you do not have access to it."


def test_unknown_model_is_a_404_on_completions_and_model_retrieval(server: Server) -> None:
    client = server.client()
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hello", max_tokens=2)
    _assert_model_not_found(info, "nope")
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="nope", prompt="hello", max_tokens=2, stream=True)
    _assert_model_not_found(info, "nope")
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gamma")
    _assert_model_not_found(info, "gamma")
    with pytest.raises(openai.NotFoundError) as info:  # ids may contain slashes, like hub ids
        client.models.retrieve("org/tiny")
    _assert_model_not_found(info, "org/tiny")


def test_negative_max_tokens_is_a_400_naming_the_parameter(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().chat.completions.create(model="alpha", messages=MESSAGES, max_tokens=-5)
    error = info.value.body
    assert isinstance(error, dict) and error["param"] == "max_tokens" and error["type"] == "invalid_request_error"
    assert "max_tokens" in error["message"]


def test_over_long_prompt_is_a_400_context_length_exceeded(server: Server) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        server.client().completions.create(model="tiny", prompt="hello there " * 400, max_tokens=10)
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "context_length_exceeded"
    assert "maximum context length is 512 tokens" in error["message"]


def test_over_long_chat_is_a_400_context_length_exceeded(server: Server) -> None:
    client = server.client()
    long_messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there " * 400}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="alpha", messages=long_messages, max_tokens=10, stream=stream)
        error = info.value.body
        assert isinstance(error, dict) and error["code"] == "context_length_exceeded"
        assert error["param"] == "messages" and error["type"] == "invalid_request_error"
        assert "maximum context length is 512 tokens" in error["message"] and "in the messages" in error["message"]
    # A short prompt with too many completion tokens: both counts are in the message.
    prompt_tokens = len(
        encode_prompt(
            chat_prompt(server.engine.tokenizer, [{"role": "user", "content": QUESTION}]), server.engine.tokenizer
        )
    )
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, max_completion_tokens=500)
    error = info.value.body
    assert isinstance(error, dict) and error["code"] == "context_length_exceeded"
    assert f"({prompt_tokens} in the messages, 500 in the completion)" in error["message"]
    fits = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=512 - prompt_tokens)
    assert fits.choices[0].message.content is not None


def test_other_bad_requests_are_openai_shaped(server: Server) -> None:
    url = f"{server.url}/v1/chat/completions"
    cases = [
        (b"{not json", 400, None),
        (b'{"model": "alpha"}', 400, "messages"),
        (b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "logprobs": true}', 400, "logprobs"),
        (b'{"model": "alpha", "messages": [{"role": "robot", "content": "hi"}]}', 400, "messages[0].role"),
        (b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "n": 9}', 400, "n"),
        (b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}', 400, "temperature"),
        (b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}], "top_p": 1.5}', 400, "top_p"),
        (
            b'{"model": "alpha", "messages": [{"role": "user", "content": "hi"}],'
            b' "tools": [{"type": "function", "function": {"name": "f"}}]}',
            400,
            "tools",
        ),
    ]
    for body, status, param in cases:
        response = httpx.post(url, content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, body
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and error["message"]
    completions = [
        (b'{"model": "alpha", "prompt": "hi", "temperature": 3}', "temperature"),
        (b'{"model": "alpha", "prompt": "hi", "tools": []}', "tools"),
        (b'{"model": "alpha", "prompt": "hi", "max_tokens": -5}', "max_tokens"),
    ]
    for body, param in completions:
        response = httpx.post(
            f"{server.url}/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, body
        error = response.json()["error"]
        assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]
    missing = httpx.get(f"{server.url}/v1/nothing-here")
    assert missing.status_code == 404 and missing.json()["error"]["message"]


def test_adapter_arguments_are_checked(tiny_llama_dir: Path, tmp_path: Path) -> None:
    assert parse_adapters(["a=/x/one", "/y/two"]) == {"a": Path("/x/one"), "two": Path("/y/two")}
    with pytest.raises(TunelabError, match="given twice"):
        parse_adapters(["a=/x", "a=/y"])
    with pytest.raises(TunelabError, match="not a PEFT adapter folder"):
        build_engine(str(tiny_llama_dir), {"bad": tmp_path})
    result = CliRunner().invoke(serve_app, ["--model", str(tiny_llama_dir), "--adapter", f"x={tmp_path}"])
    assert result.exit_code != 0 and isinstance(result.exception, TunelabError)


def test_api_key_is_required_on_every_route_when_set(server: Server) -> None:
    app = create_app(server.engine, frozenset({"k-1", "k-2"}))
    with TestClient(app) as http:
        routes = [("get", "/v1/models"), ("get", "/v1/models/tiny"), ("get", "/metrics"), ("get", "/openapi.json"),
                  ("get", "/docs"), ("post", "/v1/chat/completions"), ("post", "/v1/completions")]  # fmt: skip
        for method, path in routes:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k-1"}):
                response = getattr(http, method)(path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        assert http.get("/health").status_code == 200  # probes stay open; they reveal nothing
        assert http.get("/v1/models", headers={"Authorization": "Bearer k-2"}).status_code == 200
    keyed = openai.OpenAI(base_url="http://testserver/v1", api_key="k-1", http_client=TestClient(app))
    reply = keyed.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0)
    assert reply.choices[0].message.content == server.expected["tiny"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url="http://testserver/v1", api_key="nope", http_client=TestClient(app)).models.list()


def test_metrics_count_requests_tokens_and_latency(server: Server) -> None:
    with TestClient(create_app(server.engine)) as http:
        body = {"model": "alpha", "messages": MESSAGES, "max_tokens": 5, "temperature": 0}
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert http.post("/v1/chat/completions", json={**body, "model": "nope"}).status_code == 404
        text = http.get("/metrics").text
    assert 'tunelab_requests_total{route="/v1/chat/completions",status="200"} 1.0' in text
    assert 'tunelab_requests_total{route="/v1/chat/completions",status="404"} 1.0' in text
    assert 'tunelab_completion_tokens_total{model="alpha"} 5.0' in text
    assert 'tunelab_request_seconds_count{route="/v1/chat/completions"} 2.0' in text
    assert "tunelab_requests_in_progress 1.0" in text  # the /metrics request itself


def test_keys_file_and_empty_keys(tmp_path: Path) -> None:
    from tunelab.errors import TunelabError
    from tunelab.inference_server.cli import read_keys

    keys = tmp_path / "keys"
    keys.write_text("# team keys\nalpha-key\n\nbeta-key  # ci\n")
    assert read_keys(["cli-key"], keys) == {"cli-key", "alpha-key", "beta-key"}
    with pytest.raises(TunelabError, match="must not be empty"):
        read_keys([" "], None)
    with pytest.raises(TunelabError, match="no such file"):
        read_keys([], tmp_path / "missing")
