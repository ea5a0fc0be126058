"""LLMEngine(runner=): a ModelRunner built apart runs the engine as the one
it builds itself would, counts its compiles into the engine's stats, and a
runner built for another config is refused. Engines compile each step on
first use (warm_up=False)."""
import dataclasses

import numpy as np
import pytest

import models
from jpaged import EngineConfig, SamplingParams
from jpaged.engine import LLMEngine
from jpaged.model_runner import ModelRunner
from tiny import ENGINE, LLAMA

# (200 blocks: the pool of test_engine.py's engines, whose compiled steps it shares)
CONFIG = EngineConfig(model="tiny", num_gpu_blocks=200, **ENGINE)


@pytest.fixture(scope="module")
def llama():
    return models.random_model(LLAMA, dtype="float32", seed=1)


def build_runner(model, config: EngineConfig) -> ModelRunner:
    sched = config.get_scheduler_config(model.config.max_position_embeddings)
    return ModelRunner(model, config.cache_config(), sched, config.parallel_config(),
                       attention_backend=config.attention_backend,
                       max_decode_window=config.max_decode_window,
                       eos_token_ids=[LLAMA["eos_token_id"]])


def generate(engine) -> list[list[int]]:
    rng = np.random.default_rng(3)
    sps = [SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
           SamplingParams(temperature=0.9, top_p=0.8, seed=5, max_tokens=7),
           SamplingParams(n=2, temperature=1.0, seed=6, max_tokens=6, ignore_eos=True)]
    for i, (n, sp) in enumerate(zip((5, 19, 11), sps)):
        engine.add_request(str(i), None, sp,
                           prompt_token_ids=rng.integers(3, LLAMA["vocab_size"], n).tolist())
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    return [[c.token_ids for c in done[str(i)].outputs] for i in range(len(sps))]


def test_a_given_runner_generates_what_an_own_one_does(llama):
    own = LLMEngine(CONFIG, model=llama, warm_up=False, progress=False)
    expected = generate(own)
    runner = build_runner(llama, CONFIG)
    assert runner.stats.num_compiles == 0
    engine = LLMEngine(CONFIG, model=llama, warm_up=False, progress=False, runner=runner)
    assert engine.runner is runner and engine.stats is runner.stats
    assert generate(engine) == expected
    # the runner built apart counts its compiles into the engine's stats,
    # which a reset keeps
    compiles = engine.stats.num_compiles
    assert compiles > 0 and engine.stats.compiles_after_warmup == compiles
    assert engine.stats.num_steps > 0
    engine.use_block_manager()
    assert engine.stats.num_steps == 0 and engine.stats.num_compiles == compiles


def test_a_runner_built_for_another_config_is_refused(llama):
    runner = build_runner(llama, CONFIG)
    other = dataclasses.replace(CONFIG, max_num_seqs=4, max_decode_window=4)
    with pytest.raises(ValueError, match=r"built for another config \(max_num_seqs: the "
                                         r"runner's 8, the config's 4; max_decode_window: the "
                                         r"runner's 8, the config's 4\)"):
        LLMEngine(other, model=llama, warm_up=False, progress=False, runner=runner)
    with pytest.raises(ValueError, match=r"block_size: the runner's 4, the config's 8"):
        LLMEngine(dataclasses.replace(CONFIG, block_size=8), model=llama, warm_up=False,
                  progress=False, runner=runner)
