"""models.compiler_options: the XLA debug options every jitted model step
compiles with (models.base.COMPILER_OPTIONS, per platform).

On CPU the GPU table does nothing, so these tests show the options reach
each compile by giving the CPU an option XLA does not know: the compile
then fails naming it."""
import dataclasses

import jax
import numpy as np
import pytest

import models
from jpaged import SamplingParams
from tiny import ENGINE, LLAMA

BOGUS = {"xla_jpaged_no_such_option": 1}


@pytest.fixture(scope="module")
def llama():
    return models.random_model(LLAMA, dtype="float32", seed=1)


def test_the_table_per_platform(monkeypatch):
    gpu = models.compiler_options("gpu")
    assert gpu == {"xla_gpu_enable_triton_gemm": False, "xla_gpu_experimental_force_split_k": 1}
    gpu["xla_gpu_enable_triton_gemm"] = True  # a copy: the table is unchanged
    assert models.compiler_options("gpu")["xla_gpu_enable_triton_gemm"] is False
    assert models.compiler_options("tpu") == {}
    # Names this XLA knows (an unknown one fails the compile, on any platform).
    assert jax.jit(lambda x: x + 1, compiler_options=models.compiler_options("gpu"))(1) == 2
    monkeypatch.setitem(models.base.COMPILER_OPTIONS, jax.default_backend(), BOGUS)
    assert models.compiler_options() == BOGUS


def test_the_model_step_compiles_with_them(llama, monkeypatch):
    """LoadedModel.logits / generate_greedy jit the step with them."""
    want = dataclasses.replace(llama, _jit_apply=None).logits([5, 6, 7], block_size=4)
    monkeypatch.setitem(models.base.COMPILER_OPTIONS, jax.default_backend(),
                        models.compiler_options("gpu"))
    got = dataclasses.replace(llama, _jit_apply=None).logits([5, 6, 7], block_size=4)
    np.testing.assert_array_equal(got, want)
    monkeypatch.setitem(models.base.COMPILER_OPTIONS, jax.default_backend(), BOGUS)
    with pytest.raises(Exception, match="xla_jpaged_no_such_option"):
        dataclasses.replace(llama, _jit_apply=None).logits([5, 6, 7], block_size=4)


def _generate(llama):
    """Greedy tokens of one request through an engine without warm-up (only
    the prefill bucket and window the request uses compile)."""
    from jpaged import EngineConfig
    from jpaged.engine import LLMEngine
    config = EngineConfig(model="tiny", num_gpu_blocks=64, **dict(ENGINE, max_decode_window=2))
    eng = LLMEngine(config, model=llama, warm_up=False, progress=False)
    eng.add_request("0", None, SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True),
                    prompt_token_ids=[5, 6, 7, 8, 9])
    outs = []
    while eng.has_unfinished_requests():
        outs += eng.step()
    return outs[-1]


def test_the_engine_steps_compile_with_them(llama, monkeypatch):
    """The runner's step jits (prefill and decode share one options dict):
    with an unknown option the request fails at its prefill's compile,
    naming it, and the engine goes on; with the GPU table it runs."""
    monkeypatch.setitem(models.base.COMPILER_OPTIONS, jax.default_backend(), BOGUS)
    out = _generate(llama)
    assert out.error is not None and "xla_jpaged_no_such_option" in out.error
    monkeypatch.setitem(models.base.COMPILER_OPTIONS, jax.default_backend(),
                        models.compiler_options("gpu"))
    out = _generate(llama)
    assert out.error is None and len(out.outputs[0].token_ids) == 4
