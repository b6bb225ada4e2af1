"""Continuous batching in the PyTorch engine: concurrent requests share forward passes and each still gets the
answer it gets alone (greedy: the same tokens; seeded sampling and penalties: the same draws)."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from peft import IA3Config, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from test_serve import make_adapter
from tunelab.data.render import encode_prompt
from tunelab.inference import chat_prompt
from tunelab.serving.engines import TorchEngine
from tunelab.serving.generation import Sampling, TextGeneration


@dataclass(frozen=True)
class Ask:
    model: str
    question: str
    sampling: Sampling


# Different prompt lengths, budgets (so requests leave the batch at different steps) and adapters.
ASKS = [
    Ask("tiny", "hi", Sampling(max_tokens=6, temperature=0)),
    Ask("alpha", "what is your name", Sampling(max_tokens=14, temperature=0)),
    Ask("beta", "tell me a long story about the sea and the ships on it", Sampling(max_tokens=9, temperature=0)),
    Ask("tiny", "what is your name", Sampling(max_tokens=16, temperature=0)),
    Ask("alpha", "hi", Sampling(max_tokens=11, temperature=0)),
    Ask("alpha", "how are you today", Sampling(max_tokens=12, temperature=0, frequency_penalty=1.5)),
    Ask("beta", "what is your name", Sampling(max_tokens=12, temperature=0.9, seed=7)),
    Ask("tiny", "tell me a story", Sampling(max_tokens=10, temperature=1.0, top_p=0.9, seed=3, presence_penalty=1)),
]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> TorchEngine:
    folder = tmp_path_factory.mktemp("batch-adapters")
    adapters = {name: make_adapter(tiny_llama_dir, folder / name, seed) for name, seed in (("alpha", 1), ("beta", 3))}
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    engine = TorchEngine("tiny", model, AutoTokenizer.from_pretrained(tiny_llama_dir), adapters, max_adapters=2)
    # Wait for every running request's next step however slow a test thread is: batching must happen here.
    engine.scheduler.gather_s = 30.0
    return engine


def generation(engine: TorchEngine, ask: Ask) -> TextGeneration:
    served = engine.served(ask.model)
    prompt = encode_prompt(chat_prompt(served.tokenizer, [{"role": "user", "content": ask.question}]), served.tokenizer)
    return TextGeneration(served.open(0), prompt, ask.sampling, served.tokenizer, served.eos_ids)


def alone(engine: TorchEngine, ask: Ask) -> list[int]:
    return list(generation(engine, ask).tokens())


def test_concurrent_requests_share_passes_and_answer_as_alone(engine: TorchEngine) -> None:
    expected = [alone(engine, ask) for ask in ASKS]
    assert engine.scheduler.batches == 0  # one at a time: nothing to batch
    assert len({tuple(ids) for ids in expected}) == len(ASKS), "the requests must differ for the test to mean much"
    start = threading.Barrier(len(ASKS))

    def run(ask: Ask) -> list[int]:
        start.wait()
        return alone(engine, ask)

    with ThreadPoolExecutor(max_workers=len(ASKS)) as pool:
        answers = list(pool.map(run, ASKS))
    assert answers == expected
    assert engine.scheduler.batches > 0
    assert engine.scheduler.mixed_batches > 0  # LoRA adapters and the base rows in one forward
    assert not engine.scheduler.running and all(users == 0 for users in engine.registry.loaded.values())


def test_a_request_joins_and_leaves_a_running_batch(engine: TorchEngine) -> None:
    first, late = ASKS[3], ASKS[0]  # one model; the late one joins after the first has made 4 tokens and ends first
    expected = (alone(engine, first), alone(engine, late))
    batches, joined = engine.scheduler.batches, threading.Event()

    def run_first() -> list[int]:
        ids = []
        for token in generation(engine, first).tokens():
            ids.append(token)
            if len(ids) == 4:
                joined.set()
        return ids

    def run_late() -> list[int]:
        joined.wait()
        return alone(engine, late)

    with ThreadPoolExecutor(max_workers=2) as pool:
        answers = (pool.submit(run_first), pool.submit(run_late))
        assert (answers[0].result(), answers[1].result()) == expected
    assert engine.scheduler.batches > batches


def test_batches_are_split_at_max_batch(engine: TorchEngine) -> None:
    greedy = [ask for ask in ASKS if ask.model == "alpha"]  # one adapter: one group, split in batches of 2
    expected = [alone(engine, ask) for ask in greedy]
    engine.scheduler.max_batch = 2
    try:
        with ThreadPoolExecutor(max_workers=len(greedy)) as pool:
            assert list(pool.map(lambda ask: alone(engine, ask), greedy)) == expected
    finally:
        engine.scheduler.max_batch = 16


def test_an_abandoned_request_does_not_hold_the_batch(engine: TorchEngine) -> None:
    """A client that stops reading and closes its stream leaves; the others go on without waiting for it."""
    tokens = generation(engine, ASKS[0]).tokens()
    next(tokens)
    tokens.close()
    assert not engine.scheduler.running
    assert alone(engine, ASKS[4]) == alone(engine, ASKS[4])


def test_a_sliding_window_model_decodes_each_request_alone(tiny_phi3_dir: Path) -> None:
    """A sliding-window cache cannot be padded and sliced like a full one: such requests still run concurrently
    and answer as alone, one forward each."""
    config = AutoConfig.from_pretrained(tiny_phi3_dir, sliding_window=4)
    model = AutoModelForCausalLM.from_pretrained(tiny_phi3_dir, config=config)
    engine = TorchEngine("tiny", model, AutoTokenizer.from_pretrained(tiny_phi3_dir))
    asks = [Ask("tiny", ask.question, ask.sampling) for ask in ASKS[:4]]
    expected = [alone(engine, ask) for ask in asks]
    with ThreadPoolExecutor(max_workers=len(asks)) as pool:
        assert list(pool.map(lambda ask: alone(engine, ask), asks)) == expected
    assert engine.scheduler.batches == 0


def test_the_scheduler_thread_ends_when_idle(engine: TorchEngine) -> None:
    scheduler = engine.scheduler
    scheduler.idle_s = 0.0
    try:
        alone(engine, ASKS[0])
        thread = scheduler.thread
        if thread is not None:
            thread.join(timeout=60)
            assert not thread.is_alive()
        assert scheduler.thread is None
        assert alone(engine, ASKS[0]) == alone(engine, ASKS[0])  # and a new one starts with the next request
    finally:
        scheduler.idle_s = 30.0


def test_adapters_that_cannot_mix_are_batched_one_adapter_a_pass(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """IA3 has no mixed batches in PEFT: each adapter's requests share their own forward passes."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    adapters = {name: make_ia3(tiny_llama_dir, tmp_path / name, seed) for name, seed in (("alpha", 1), ("beta", 3))}
    engine = TorchEngine("tiny", model, AutoTokenizer.from_pretrained(tiny_llama_dir), adapters, max_adapters=2)
    engine.scheduler.gather_s = 30.0
    expected = [alone(engine, ask) for ask in ASKS]
    with ThreadPoolExecutor(max_workers=len(ASKS)) as pool:
        assert list(pool.map(lambda ask: alone(engine, ask), ASKS)) == expected
    assert engine.scheduler.batches > 0 and engine.scheduler.mixed_batches == 0


def make_ia3(base_dir: Path, out: Path, seed: int) -> Path:
    """An IA3 adapter with scales away from 1, so that it changes the answers."""
    torch.manual_seed(seed)
    config = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"])
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    with torch.no_grad():
        for name, parameter in peft.named_parameters():
            if "ia3_l" in name:
                parameter.uniform_(0.2, 2.0)
    peft.save_pretrained(str(out))
    return out
