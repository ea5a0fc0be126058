"""Tensor parallelism on 4 virtual CPU devices.

jax fixes its CPU device count when its backend starts, and other tests in
this pytest process have started it with one device, so the multi-device
runs happen in one subprocess (this file run as a script with
XLA_FLAGS=--xla_force_host_platform_device_count=4). It returns what it saw
as JSON; the tests below assert on it. Checks that need no devices run here.

The subprocess compiles for minutes, so it (and the two processes of the
multi-host test) run in tests/background.py's lane, queued (`start_early`)
as soon as the session's tests are collected: beside the tests before
these, which wait for them.
"""
import json
import os
import sys

import numpy as np
import pytest

NUM_DEVICES = 4
# 8 query / 4 KV heads: the pool splits 2 and 4 ways.
LLAMA_GQA = {"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 8, "num_key_value_heads": 4,
             "vocab_size": 128, "max_position_embeddings": 256, "eos_token_id": 2}
# 2 KV heads on 4 devices: each KV head replicated on the 2 devices that read it.
LLAMA_KV2 = dict(LLAMA_GQA, num_key_value_heads=2, tie_word_embeddings=True)
# 3 KV heads (like SmolLM2) on 2 devices: neither divides the other, so the
# pool holds lcm(3, 2) = 6 heads, 3 per device.
LLAMA_KV3 = dict(LLAMA_GQA, hidden_size=48, num_attention_heads=6, num_key_value_heads=3,
                 vocab_size=120)
# SmolLM2's 9 query / 3 KV heads (head_dim 8), with q/k/v/o biases: at tp 2
# each group of 3 query heads is padded with a zero head to 4 (12 heads) and
# each KV head stored twice (6); at tp 4, 12 query and 12 KV heads.
LLAMA_9_HEADS = dict(LLAMA_KV3, hidden_size=72, intermediate_size=96, num_attention_heads=9,
                     attention_bias=True)
OPT = {"architectures": ["OPTForCausalLM"], "hidden_size": 64, "ffn_dim": 128,
       "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 128,
       "max_position_embeddings": 256, "word_embed_proj_dim": 64,
       "do_layer_norm_before": True, "eos_token_id": 2}
# Small bucket sets keep compile time down: decode windows 1, 2, 4; prefill 16, 32.
ENGINE = dict(block_size=4, max_num_seqs=4, max_model_len=32, max_num_batched_tokens=32,
              swap_space=0.0, max_decode_window=4)
PROMPT_LENS = (10, 12, 14, 9)  # enough to force swapping in a 16-block pool
SHORT_LENS = (5, 7, 6, 3)  # one prefill bucket, one decode bucket


# ---------------------------------------------------------------- the worker


def _prompts(vocab, lens=PROMPT_LENS, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, vocab, n).tolist() for n in lens]


def _engine_generate(model, tp, prompts, sp, **engine):
    """Greedy outputs through LLMEngine without warm-up (compiles only the
    buckets the workload uses)."""
    from jpaged import EngineConfig
    from jpaged.engine import LLMEngine
    config = EngineConfig(model="tiny", tensor_parallel_size=tp,
                          **{**ENGINE, "num_gpu_blocks": 64, **engine})
    eng = LLMEngine(config, model=model, warm_up=False, progress=False)
    for i, p in enumerate(prompts):
        eng.add_request(str(i), None, sp, prompt_token_ids=p)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            done[out.request_id] = out
    return eng, [done[str(i)].outputs[0].token_ids for i in range(len(prompts))]


def _spec(x) -> list:
    """x's PartitionSpec as a list, trailing Nones dropped (P(None, "tp") and
    P(None, "tp", None) are the same sharding)."""
    spec = [None if a is None else str(a) for a in getattr(x.sharding, "spec", ())]
    while spec and spec[-1] is None:
        spec.pop()
    return spec


def _describe(runner) -> dict:
    """Shardings and per-device shapes of the runner's params and pool."""
    import jax
    pool = runner.kv_caches[0]
    shards = sorted(pool.addressable_shards, key=lambda s: s.device.id)
    params = {}
    for path, x in jax.tree_util.tree_leaves_with_path(runner.model.params):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        params[name] = dict(spec=_spec(x), shape=list(x.shape),
                            shard_shapes=[list(s.data.shape) for s in x.addressable_shards])
    return dict(pool_spec=_spec(pool), pool_shape=list(pool.shape),
                pool_shard_shapes=[list(s.data.shape) for s in shards],
                pool_devices=len(pool.sharding.device_set),
                num_kv_heads=runner.model.config.num_kv_heads,
                num_heads=runner.model.config.num_heads,
                params=params)


def _collectives(model) -> dict:
    """Collective ops in the compiled prefill (5 tokens) and decode steps of a
    (sharded) model: {"prefill": {op: count}, "decode": {...}}."""
    import re
    import jax
    import jax.numpy as jnp
    from models.base import single_sequence_metadata
    kv = model.init_kv_caches(8, 4)
    out = {}
    for kind, n in (("prefill", 5), ("decode", 1)):
        positions, metadata = single_sequence_metadata(0, n, np.arange(1, 8), 4)
        text = jax.jit(model.apply).lower(model.params, jnp.zeros((n,), jnp.int32),
                                          jnp.asarray(positions), kv, metadata).compile().as_text()
        out[kind] = {op: len(re.findall(rf"\b{op}(-start)?\(", text))
                     for op in ("all-reduce", "all-gather", "all-to-all", "collective-permute",
                                "reduce-scatter")}
    return out


def _fused_shards(original, sharded, tp) -> dict:
    """Whether device d's share of layer 0's fused kernels is [q_d | k_d | v_d]
    (and [gate_d | up_d]) of the original model's projections (no padding or
    repeats: heads that divide over tp)."""
    from models.convert import unfuse_params
    parts = unfuse_params(original.params, original.config.fused_params())["layers_0"]
    out = {}
    for module, names in (("self_attn/qkv_proj", ("q_proj", "k_proj", "v_proj")),
                          ("mlp/gate_up_proj", ("gate_proj", "up_proj"))):
        outer, proj = module.split("/")
        if proj not in sharded.params["layers_0"].get(outer, {}):
            continue
        kernel = sharded.params["layers_0"][outer][proj]["kernel"]
        whole = [np.asarray(parts[outer][name]["kernel"]) for name in names]
        shards = sorted(kernel.addressable_shards, key=lambda s: s.device.id)
        out[module] = all(
            np.array_equal(np.asarray(s.data),
                           np.concatenate([w.reshape(w.shape[0], tp, -1)[:, d] for w in whole],
                                          axis=-1))
            for d, s in enumerate(shards))
    return out


def _pool_heads(runner) -> np.ndarray:
    """Layer 0 of the pool, whole on the host: [2, num_blocks, heads, bs, D]."""
    return np.asarray(runner.kv_caches[0])


def _shards_equal(runner) -> list:
    """[i][j]: whether devices i and j hold identical pool shards (layer 0)."""
    shards = [np.asarray(s.data) for s in
              sorted(runner.kv_caches[0].addressable_shards, key=lambda s: s.device.id)]
    return [[bool(np.array_equal(a, b)) for b in shards] for a in shards]


SWAPPING = dict(num_gpu_blocks=16, swap_space=16 * 1024 / (1 << 30), preemption_mode="swap")


def _llm_case(model, tp) -> dict:
    """LLM(..., tensor_parallel_size=tp) with warm-up: greedy under a small pool
    that forces swapping, beam search (forks, copy-on-write), then the runner's
    block copy and swap helpers directly."""
    from jpaged import LLM, SamplingParams
    llm = LLM(model, use_tqdm_warmup=False, tensor_parallel_size=tp,
              **dict(ENGINE, **SWAPPING))
    runner = llm.engine.runner
    traces = llm.engine.stats.num_compiles
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    outs = llm.generate(prompt_token_ids=_prompts(model.config.vocab_size),
                        sampling_params=greedy, use_tqdm=False)
    beam = SamplingParams(n=2, best_of=3, use_beam_search=True, temperature=0.0,
                          max_tokens=6, ignore_eos=True)
    beams = llm.generate(prompt_token_ids=_prompts(model.config.vocab_size, (7,), seed=1),
                         sampling_params=beam, use_tqdm=False)[0]
    sched = llm.engine.scheduler
    res = dict(tokens=[o.outputs[0].token_ids for o in outs],
               beams=[c.token_ids for c in beams.outputs],
               num_preemptions=sched.stats.num_preemptions, num_swaps_out=sched.stats.num_swaps_out,
               pool=_pool_heads(runner).tolist())
    # Helpers on the sharded pool: copy block 1 -> 2, swap 3 out and back into 4.
    runner.copy_blocks([(1, 2)])
    runner.swap_out([(3, 0)])
    runner.swap_in([(0, 4)])
    pool = _pool_heads(runner)
    res.update(copy_ok=bool(np.array_equal(pool[:, 2], pool[:, 1])),
               swap_ok=bool(np.array_equal(pool[:, 4], pool[:, 3])),
               new_traces=llm.engine.stats.num_compiles - traces,
               describe=_describe(runner))
    return res


def _worker() -> dict:
    import jax
    import models
    from jpaged import SamplingParams
    out = {"num_devices": len(jax.devices()), "cases": {}, "errors": {}}
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llama = models.random_model(LLAMA_GQA, seed=1)
    for tp in (1, 2):
        out["cases"][f"llm_llama_gqa_tp{tp}"] = _llm_case(llama, tp)
    for name, cfg, tps in (("llama_gqa", LLAMA_GQA, (1, 4)), ("opt", OPT, (1, 2, 4)),
                           ("llama_kv2", LLAMA_KV2, (1, 4)), ("llama_kv3", LLAMA_KV3, (1, 2)),
                           ("llama_9_heads", LLAMA_9_HEADS, (1, 2, 4))):
        model = llama if name == "llama_gqa" else models.random_model(cfg, seed=2)
        prompts = _prompts(cfg["vocab_size"], SHORT_LENS)
        for tp in tps:
            eng, tokens = _engine_generate(model, tp, prompts, greedy)
            out["cases"][f"{name}_tp{tp}"] = case = dict(
                tokens=tokens, describe=_describe(eng.runner),
                pool=_pool_heads(eng.runner).tolist(), shards_equal=_shards_equal(eng.runner))
            if name == "llama_9_heads":  # runner.model: the padded, sharded twin
                case["logits"] = eng.runner.model.logits(prompts[0], block_size=4).tolist()
            if tp > 1:
                case["collectives"] = _collectives(eng.runner.model)
            if (name, tp) in (("llama_gqa", 4), ("opt", 2), ("opt", 4)):
                case["fused_shards"] = _fused_shards(model, eng.runner.model, tp)
        if name == "opt":
            try:  # 4 heads on 3 devices: OPT's head_dim follows the head count, no padding
                _engine_generate(model, 3, prompts, greedy)
            except ValueError as e:
                out["errors"]["heads"] = str(e)
        if name == "llama_kv3":
            try:
                _engine_generate(model, 8, prompts, greedy)
            except ValueError as e:
                out["errors"]["devices"] = str(e)
    # A Pallas kernel (the GPU one, interpret mode) per shard under shard_map.
    from jpaged import parallel
    one_layer = dict(LLAMA_KV2, num_hidden_layers=1)
    ids = _prompts(128, (6,))[0]
    ref = models.random_model(one_layer, seed=3)
    pallas = parallel.shard_model(
        models.random_model(one_layer, seed=3, attention_backend="gpu", interpret=True),
        parallel.make_mesh(4))
    # one prefill (ragged kernel), then decode steps (decode kernel)
    out["pallas"] = dict(ref=ref.generate_greedy(ids, 3, block_size=4, stop_at_eos=False),
                         tp4=pallas.generate_greedy(ids, 3, block_size=4, stop_at_eos=False))
    return out


def _multihost_worker() -> dict:
    """One of two processes with 2 devices each: tp=4 spans both."""
    import jax
    import models
    from jpaged import SamplingParams
    llama = models.random_model(LLAMA_GQA, seed=1)
    greedy = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    eng, tokens = _engine_generate(llama, 4, _prompts(128), greedy, **SWAPPING)
    return dict(process=jax.process_index(), num_devices=len(jax.devices()),
                num_local_devices=len(jax.local_devices()), tokens=tokens,
                num_swaps_out=eng.stats.num_swaps_out,
                pool_devices=len(eng.runner.kv_caches[0].sharding.device_set))


# ---------------------------------------------------------------- the tests


_JOBS = {}


def _worker_job():
    """The worker's run in the background lane (queued once), its compiled
    steps in a cache directory of its own (nothing this process writes)."""
    import background  # (tests/: not on the path of this file run as a script)
    if "worker" not in _JOBS:
        env = background.cpu_env(NUM_DEVICES)
        if env.get("JPAGED_XLA_CACHE", "off").lower() not in ("off", "0", ""):
            env["JPAGED_XLA_CACHE"] = os.path.join(env["JPAGED_XLA_CACHE"], "tp-worker")
        _JOBS["worker"] = background.run([sys.executable, __file__], env=env, timeout=600)
    return _JOBS["worker"]


def _multihost_job():
    """The two processes of test_two_processes_share_one_mesh in the lane."""
    import background
    if "multihost" not in _JOBS:
        _JOBS["multihost"] = background.submit(
            lambda: background.run_processes(background.distributed_commands(
                [sys.executable, __file__, "--multihost"], 2, 2), timeout=300))
    return _JOBS["multihost"]


def start_early(items):
    """Queues the subprocess runs that the selected tests assert on."""
    if any("tp_run" in item.fixturenames for item in items):
        _worker_job()
    if any(item.originalname == "test_two_processes_share_one_mesh" for item in items):
        _multihost_job()


def _last_json_line(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def tp_run():
    return _last_json_line(_worker_job().result())


def test_worker_sees_four_devices(tp_run):
    assert tp_run["num_devices"] == NUM_DEVICES


def test_llm_greedy_and_beams_equal_one_device(tp_run):
    one, many = tp_run["cases"]["llm_llama_gqa_tp1"], tp_run["cases"]["llm_llama_gqa_tp2"]
    assert many["tokens"] == one["tokens"]
    assert many["beams"] == one["beams"]
    # the small pool really preempted by swapping, on one device and on many
    assert many["num_swaps_out"] > 0 and many["num_swaps_out"] == one["num_swaps_out"]
    # the same block ids on every shard: the pools hold the same K/V in the same places
    np.testing.assert_allclose(np.array(many["pool"]), np.array(one["pool"]), atol=1e-4)


@pytest.mark.parametrize("tp", [1, 2])
def test_llm_helpers_and_no_compile_after_warm_up(tp_run, tp):
    case = tp_run["cases"][f"llm_llama_gqa_tp{tp}"]
    assert case["copy_ok"] and case["swap_ok"]
    assert case["new_traces"] == 0


@pytest.mark.parametrize("case,tp", [("llm_llama_gqa_tp2", 2), ("llama_gqa_tp4", 4)])
def test_params_and_pool_are_sharded(tp_run, case, tp):
    d = tp_run["cases"][case]["describe"]
    assert d["pool_spec"] == [None, None, "tp"]
    assert d["pool_devices"] == tp
    assert d["pool_shape"][2] == 4
    assert d["pool_shard_shapes"] == [d["pool_shape"][:2] + [4 // tp] + d["pool_shape"][3:]] * tp
    p = d["params"]
    # the fused q/k/v kernel: 8 query + 2 x 4 KV heads of 8 columns, split by column
    column = p["layers_0/self_attn/qkv_proj/kernel"]
    assert column["spec"] == [None, "tp"] and column["shard_shapes"] == [[64, 128 // tp]] * tp
    assert "layers_0/self_attn/q_proj/kernel" not in p
    assert p["layers_0/self_attn/o_proj/kernel"]["spec"] == ["tp"]
    assert p["layers_0/self_attn/o_proj/kernel"]["shard_shapes"] == [[64 // tp, 64]] * tp
    assert p["layers_1/mlp/gate_up_proj/kernel"]["shard_shapes"] == [[64, 256 // tp]] * tp
    assert p["layers_1/mlp/down_proj/kernel"]["shard_shapes"] == [[128 // tp, 64]] * tp
    assert p["embed_tokens/embedding"]["shard_shapes"] == [[128 // tp, 64]] * tp
    assert p["lm_head"]["shard_shapes"] == [[64, 128 // tp]] * tp
    assert p["norm/scale"]["spec"] == [] and p["norm/scale"]["shard_shapes"] == [[64]] * tp
    one = tp_run["cases"]["llm_llama_gqa_tp1"]["describe"]
    assert one["pool_devices"] == 1 and one["pool_shard_shapes"] == [one["pool_shape"]]


def test_llama_gqa_greedy_equals_one_device_on_4(tp_run):
    one, many = tp_run["cases"]["llama_gqa_tp1"], tp_run["cases"]["llama_gqa_tp4"]
    assert many["tokens"] == one["tokens"]
    np.testing.assert_allclose(np.array(many["pool"]), np.array(one["pool"]), atol=1e-4)
    # 4 KV heads on 4 devices: each holds a different one
    assert many["shards_equal"] == np.eye(4, dtype=bool).tolist()


@pytest.mark.parametrize("tp", [2, 4])
def test_opt_greedy_equals_one_device_and_is_sharded(tp_run, tp):
    one, many = tp_run["cases"]["opt_tp1"], tp_run["cases"][f"opt_tp{tp}"]
    assert many["tokens"] == one["tokens"]
    np.testing.assert_allclose(np.array(many["pool"]), np.array(one["pool"]), atol=1e-4)
    d = many["describe"]
    assert d["pool_shard_shapes"][0][2] == 4 // tp and d["pool_devices"] == tp
    p = d["params"]
    assert p["layers_0/fc1/kernel"]["shard_shapes"] == [[64, 128 // tp]] * tp
    assert p["layers_0/fc1/bias"]["shard_shapes"] == [[128 // tp]] * tp
    assert p["layers_0/fc2/kernel"]["shard_shapes"] == [[128 // tp, 64]] * tp
    assert p["layers_0/fc2/bias"]["spec"] == []
    assert p["layers_0/self_attn/out_proj/kernel"]["shard_shapes"] == [[64 // tp, 64]] * tp
    assert p["layers_0/self_attn/qkv_proj/bias"]["shard_shapes"] == [[192 // tp]] * tp
    assert p["embed_positions/embedding"]["spec"] == []
    assert many["fused_shards"] == {"self_attn/qkv_proj": True}


def test_fewer_kv_heads_than_devices_replicates_them(tp_run):
    one, many = tp_run["cases"]["llama_kv2_tp1"], tp_run["cases"]["llama_kv2_tp4"]
    assert many["tokens"] == one["tokens"]
    d = many["describe"]
    # 2 KV heads, 4 devices: head h stored on devices 2h and 2h + 1, one head each
    assert d["num_kv_heads"] == 4 and d["pool_shard_shapes"][0][2] == 1
    assert many["shards_equal"] == [[True, True, False, False], [True, True, False, False],
                                    [False, False, True, True], [False, False, True, True]]
    np.testing.assert_allclose(np.array(many["pool"]), np.repeat(np.array(one["pool"]), 2, axis=2),
                               atol=1e-4)
    # the k/v projections were repeated the same way and are split by column:
    # each device's share of the fused kernel is its 2 query heads, 1 K and 1 V head
    assert d["params"]["layers_0/self_attn/qkv_proj/kernel"]["shard_shapes"] == \
        [[64, (2 + 1 + 1) * 8]] * 4
    assert d["params"]["embed_tokens/embedding"]["spec"] == ["tp"]  # tied lm_head


def test_kv_heads_that_do_not_divide_use_lcm(tp_run):
    one, many = tp_run["cases"]["llama_kv3_tp1"], tp_run["cases"]["llama_kv3_tp2"]
    assert many["tokens"] == one["tokens"]
    d = many["describe"]
    assert d["num_kv_heads"] == 6 and d["pool_shard_shapes"][0][2] == 3
    np.testing.assert_allclose(np.array(many["pool"]), np.repeat(np.array(one["pool"]), 2, axis=2),
                               atol=1e-4)


@pytest.mark.parametrize("tp", [2, 4])
def test_query_heads_padded_per_kv_group(tp_run, tp):
    one, many = tp_run["cases"]["llama_9_heads_tp1"], tp_run["cases"][f"llama_9_heads_tp{tp}"]
    assert many["tokens"] == one["tokens"]
    ref, logits = np.array(one["logits"]), np.array(many["logits"])
    assert np.abs(logits - ref).max() < 1e-5 * np.abs(ref).max()
    d = many["describe"]
    repeats = {2: 2, 4: 4}[tp]  # lcm(3, tp) / 3 copies of each KV head
    assert d["num_heads"] == 12 and d["num_kv_heads"] == 3 * repeats
    assert d["pool_shard_shapes"][0][2] == 3 * repeats // tp
    # the pool holds each original KV head's K/V in its copies, in order
    np.testing.assert_allclose(np.array(many["pool"]),
                               np.repeat(np.array(one["pool"]), repeats, axis=2), atol=1e-5)
    p = d["params"]
    head_cols = 12 // tp * 8  # query heads per device x head_dim
    qkv_cols = head_cols + 2 * (3 * repeats // tp) * 8  # + its K and V heads
    assert p["layers_0/self_attn/qkv_proj/kernel"]["shard_shapes"] == [[72, qkv_cols]] * tp
    assert p["layers_0/self_attn/qkv_proj/bias"]["shard_shapes"] == [[qkv_cols]] * tp
    assert p["layers_0/self_attn/o_proj/kernel"]["shard_shapes"] == [[head_cols, 72]] * tp
    assert p["layers_0/self_attn/o_proj/bias"]["spec"] == []
    assert one["describe"]["num_heads"] == 9 and one["describe"]["num_kv_heads"] == 3


def test_fused_shards_hold_their_own_heads(tp_run):
    """Device d's share of the fused kernels is its own heads' q, k, v (and
    its own gate, up columns) side by side."""
    assert tp_run["cases"]["llama_gqa_tp4"]["fused_shards"] == {
        "self_attn/qkv_proj": True, "mlp/gate_up_proj": True}


def test_fused_split_moves_no_data(tp_run):
    """The split of a fused matmul's output is local to each device: the
    compiled steps hold the same collectives as before fusing, one all-reduce
    per row-parallel matmul (2 per layer) and one for the vocab-split
    embedding lookup, one all-gather of the logits, nothing else."""
    cases = {k: v for k, v in tp_run["cases"].items() if "collectives" in v}
    assert len(cases) == 7, sorted(cases)
    for name, case in cases.items():
        for kind, counts in case["collectives"].items():
            assert counts == {"all-reduce": 2 * 2 + 1, "all-gather": 1, "all-to-all": 0,
                              "collective-permute": 0, "reduce-scatter": 0}, (name, kind)


def test_errors_name_the_problem(tp_run):
    assert "tensor_parallel_size=3 must divide the number of attention heads (4) of this " \
        "OPTConfig model" in tp_run["errors"]["heads"]
    assert "tensor_parallel_size=8 needs that many devices, but jax sees 4" in \
        tp_run["errors"]["devices"]


def test_pallas_kernel_runs_per_shard(tp_run):
    assert tp_run["pallas"]["tp4"] == tp_run["pallas"]["ref"]


def test_two_processes_share_one_mesh(tp_run):
    """The README's multi-host start-up, on one machine: two processes with 2
    CPU devices each, jax.distributed.initialize from the JAX_* variables,
    one tp=4 mesh across both; a small pool forces swapping."""
    results = [_last_json_line(p) for p in _multihost_job().result()]
    assert [r["process"] for r in results] == [0, 1]
    for r in results:
        assert r["num_devices"] == 4 and r["num_local_devices"] == 2 and r["pool_devices"] == 4
        assert r["num_swaps_out"] > 0
        assert r["tokens"] == tp_run["cases"]["llm_llama_gqa_tp1"]["tokens"]


# Checks that need no extra devices run in this process.


def test_check_divisible_errors():
    from jpaged import parallel
    from models import LlamaConfig, OPTConfig
    llama = LlamaConfig.from_hf(dict(LLAMA_GQA, intermediate_size=100))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide the MLP width "
                                         r"\(100\).*pick a divisor of 100"):
        parallel.check_divisible(llama, 3)
    with pytest.raises(ValueError, match=r"must divide the MLP width \(100\)"):
        parallel.check_divisible(llama, 8)
    opt = OPTConfig.from_hf(dict(OPT, ffn_dim=130))
    with pytest.raises(ValueError, match=r"MLP width \(130\)"):
        parallel.check_divisible(opt, 4)
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 must divide the number of "
                                         r"attention heads \(4\) of this OPTConfig model.*"
                                         r"pick a divisor of 4"):
        parallel.check_divisible(OPTConfig.from_hf(OPT), 3)
    with pytest.raises(ValueError, match=r"tensor_parallel_size must be an int >= 1, got 0"):
        parallel.check_divisible(llama, 0)
    assert parallel.sharded_heads(LlamaConfig.from_hf(LLAMA_KV3), 2)[1] == 6
    assert parallel.sharded_heads(LlamaConfig.from_hf(LLAMA_KV2), 4)[1] == 4
    assert parallel.sharded_heads(LlamaConfig.from_hf(LLAMA_GQA), 2)[1] == 4


@pytest.mark.parametrize("cfg,tp,heads", [
    (LLAMA_9_HEADS, 1, (9, 3)), (LLAMA_9_HEADS, 3, (9, 3)),   # no padding needed
    (LLAMA_9_HEADS, 2, (12, 6)),    # 3 -> 4 per group, 2 copies of each KV head
    (LLAMA_9_HEADS, 4, (12, 12)),   # 3 -> 4 per group, 4 copies: 1 query per KV head
    (LLAMA_9_HEADS, 6, (12, 6)),    # 2 copies, 6 devices: 2 query / 1 KV head each
    (LLAMA_9_HEADS, 8, (24, 24)),   # 8 copies: 5 zero heads per group
    (LLAMA_KV3, 4, (12, 12)),       # 2 -> 4 per group
    (dict(LLAMA_GQA, intermediate_size=96), 3, (12, 12)),  # 8 / 4: 2 -> 3 per group, 3 copies
    (OPT, 2, (4, 4)), (OPT, 4, (4, 4)),
])
def test_sharded_heads_rule(cfg, tp, heads):
    import models
    from jpaged import parallel
    config = models.ARCHITECTURES[models.architecture_of(cfg)].config_cls.from_hf(cfg)
    num_heads, num_kv_heads = parallel.sharded_heads(config, tp)
    assert (num_heads, num_kv_heads) == heads
    # both split evenly, whole GQA groups per device
    assert num_heads % tp == 0 and num_kv_heads % tp == 0 and num_heads % num_kv_heads == 0
    assert parallel.sharded_heads(config, tp)[0] == num_heads


def test_pad_query_heads_places_real_heads_and_zeros():
    """3 KV groups of 3 heads (head_dim 2) padded to 4: head j of group g
    moves to 4g + j; head 4g + 3 is zero in q_proj (columns, bias) and o_proj (rows)."""
    from jpaged.parallel import _pad_query_heads
    rng = np.random.default_rng(0)

    def normal(*shape):
        return rng.normal(size=shape).astype(np.float32)
    attn = dict(q_proj=dict(kernel=normal(5, 18), bias=normal(18)),
                o_proj=dict(kernel=normal(18, 5), bias=normal(5)),
                k_proj=dict(kernel=normal(5, 6)))
    out = _pad_query_heads(attn, num_kv_heads=3, head_dim=2, group_size=3,
                           padded_group_size=4)
    q = np.asarray(out["q_proj"]["kernel"]).reshape(5, 3, 4, 2)
    np.testing.assert_array_equal(q[:, :, :3], attn["q_proj"]["kernel"].reshape(5, 3, 3, 2))
    np.testing.assert_array_equal(q[:, :, 3], 0)
    qb = np.asarray(out["q_proj"]["bias"]).reshape(3, 4, 2)
    np.testing.assert_array_equal(qb[:, :3], attn["q_proj"]["bias"].reshape(3, 3, 2))
    np.testing.assert_array_equal(qb[:, 3], 0)
    o = np.asarray(out["o_proj"]["kernel"]).reshape(3, 4, 2, 5)
    np.testing.assert_array_equal(o[:, :3], attn["o_proj"]["kernel"].reshape(3, 3, 2, 5))
    np.testing.assert_array_equal(o[:, 3], 0)
    assert out["o_proj"]["bias"] is attn["o_proj"]["bias"]
    assert out["k_proj"] is attn["k_proj"]
    assert attn["q_proj"]["kernel"].shape == (5, 18)  # untouched


def test_too_many_devices_is_a_clear_error():
    import jax
    from jpaged import parallel
    n = len(jax.devices())
    with pytest.raises(ValueError, match=f"tensor_parallel_size={n + 1} needs that many "
                                         f"devices, but jax sees {n}"):
        parallel.make_mesh(n + 1)
    with pytest.raises(ValueError, match="tensor_parallel_size must be an int >= 1"):
        parallel.make_mesh(0)


if __name__ == "__main__":
    if "--multihost" in sys.argv:
        from jpaged.parallel import initialize_distributed
        initialize_distributed()  # from JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
        print(json.dumps(_multihost_worker()))
    else:
        print(json.dumps(_worker()))
