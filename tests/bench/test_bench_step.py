"""The step ceiling (jpaged.bench.step_ceiling, scripts/bench_step.py) and the step
profile (jpaged.bench.step_profile, scripts/profile_step.py) on tiny shapes.

The GPU-only parts run here too: the Pallas GPU kernels in interpret mode
through bench_step, and a GPU-shaped trace (a "/device:GPU:0" plane with
"Stream" and "XLA Ops" lines) and GPU-style HLO (cuBLAS gemm, Triton GEMM
fusion, Pallas calls on the pool) through the profile reduction.
"""
import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kernels_pallas
import models
from jpaged.bench import step_ceiling, step_profile
from tiny import LLAMA

REPO = pathlib.Path(__file__).resolve().parents[2]
BS = 4
ONE_LAYER = dict(LLAMA, num_hidden_layers=1)  # the script runs: compile time


def script(name):
    spec = importlib.util.spec_from_file_location(f"script_{name}",
                                                  REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model():
    return models.random_model(LLAMA, seed=1, attention_backend="reference")


def _copy(pool):
    return tuple(jnp.array(x, copy=True) for x in pool)


def test_decode_loop_equals_one_step_at_a_time(model):
    """K steps in one fori_loop = K separate model calls: same tokens, same pool."""
    S, C, K = 3, 5, 3
    inputs = step_ceiling.decode_inputs(model, S, C, K, BS, seed=2)
    tables = np.asarray(inputs.block_tables)
    assert tables.shape == (S, 2) and sorted(tables.ravel()) == list(range(1, 7))
    pool = _copy(inputs.kv_caches)
    kv, tokens = step_ceiling.decode_loop(model, K, BS)(
        model.params, inputs.kv_caches, inputs.tokens, inputs.positions, inputs.block_tables)
    step = jax.jit(model.apply)
    ids, want = inputs.tokens, []
    for j in range(K):
        pos = np.full(S, C + j, np.int32)
        metadata = kernels_pallas.AttentionMetadata(
            slot_mapping=jnp.asarray(tables[np.arange(S), pos // BS] * BS + pos % BS),
            block_tables=inputs.block_tables, context_lens=jnp.asarray(pos + 1),
            query_start_loc=jnp.arange(S + 1, dtype=jnp.int32), is_decode=True)
        logits, pool = step(model.params, ids, jnp.asarray(pos), pool, metadata)
        ids = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        want.append(ids)
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want[-1]))
    for a, b in zip(kv, pool):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_variants_swap_only_the_attention(model):
    """One step: no-attention writes the same slots as the full model (layer
    0: the same K/V; later layers' inputs differ without attention) and
    nothing else; without the write the pool is untouched."""
    inputs = step_ceiling.decode_inputs(model, 2, 6, 1, BS, seed=3)
    before = _copy(inputs.kv_caches)
    pools = {}
    for variant in step_ceiling.VARIANTS:
        m = step_ceiling.with_variant(model, variant)
        pools[variant], _ = step_ceiling.decode_loop(m, 1, BS)(
            model.params, _copy(before), inputs.tokens, inputs.positions, inputs.block_tables)
    assert step_ceiling.with_variant(model, "full") is model
    np.testing.assert_allclose(np.asarray(pools["no-attention"][0]), np.asarray(pools["full"][0]),
                               rtol=1e-6, atol=1e-6)
    for full, kv_only, neither, orig in zip(pools["full"], pools["no-attention"],
                                            pools["no-attention-no-kv-write"], before):
        full, kv_only, orig = np.asarray(full), np.asarray(kv_only), np.asarray(orig)
        written = (full != orig).any(axis=(0, 2, 4))  # [num_blocks, block_size]
        assert written.sum() == 2  # one new token per sequence
        np.testing.assert_array_equal((kv_only != orig).any(axis=(0, 2, 4)), written)
        np.testing.assert_array_equal(np.asarray(neither), orig)
    with pytest.raises(ValueError, match="variant must be one of"):
        step_ceiling.with_variant(model, "none")


def test_step_bytes_by_hand(model):
    """Tiny Llama: 2 layers, 2 KV heads of 10, f32; untied 320 x 64 embedding."""
    S, C, K = 4, 8, 3
    b = step_ceiling.step_bytes(model, S, C, K)
    params = sum(x.size for x in jax.tree.leaves(model.params)) * 4
    assert b["weights"] == params - 320 * 64 * 4 + S * 64 * 4
    per_token = 2 * 2 * 2 * 10 * 4  # K and V, 2 layers, 2 heads, head_dim 10, f32
    assert b["kv_read"] == S * (C + 2) * per_token  # mean over steps of C + j + 1
    assert b["kv_write"] == S * per_token
    assert b["total"] == b["weights"] + b["kv_read"] + b["kv_write"]
    assert step_ceiling.step_bytes(model, S, C, K, "no-attention")["kv_read"] == 0
    none = step_ceiling.step_bytes(model, S, C, K, "no-attention-no-kv-write")
    assert none["total"] == none["weights"]
    with pytest.raises(ValueError, match="exceed the model's max_position_embeddings"):
        step_ceiling.decode_inputs(model, 2, 250, 10, BS)


def test_bench_step_script_on_the_gpu_kernels(tmp_path, capsys):
    """bench_step.py with the Pallas GPU kernels (interpret mode: write_kv and
    the decode kernel, its own launch settings and given ones side by side):
    JSON per point, a point that cannot run recorded with its error, table
    last."""
    out = tmp_path / "step.json"
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(ONE_LAYER))
    rc = script("bench_step").main([
        "--point", f"{config}:2:5:2", "--point", f"{config}:2:300:2",
        "--variant", "full", "--dtype", "float32", "--block-size", str(BS),
        "--decode-tuning", "default", "--decode-tuning", "16/2/2",
        "--repeats", "2", "--warmup", "0", "--attention-backend", "gpu", "--interpret",
        "--out", str(out), "--no-progress"])
    assert rc == 1  # the context-300 points exceed max_position_embeddings
    res = json.loads(out.read_text())
    assert res["device"] and "commit" in res
    assert res["command"].startswith("python scripts/bench_step.py --point")
    ok, bad = res["results"][:2], res["results"][2:]
    assert [(r["tuning"], r["decode_tuning"]) for r in ok] == [
        ("default", {}), ("16/2/2", dict(chunk_tokens=16, num_warps=2, num_stages=2))]
    for r in ok:
        assert (r["model"], r["num_seqs"], r["context"], r["K"], r["variant"]) == \
            (str(config), 2, 5, 2, "full")
        assert r["ms_per_step"] > 0 and r["tok_per_s"] == pytest.approx(2e3 / r["ms_per_step"])
        assert r["roofline_ms"] == pytest.approx(1e3 * r["bytes"]["total"] / 4.8e12)
        assert r["ratio"] == pytest.approx(r["ms_per_step"] / r["roofline_ms"])
        assert len(r["call_ms"]) == 2 and r["pipelined_ms_per_step"] > 0
    assert ok[0]["bytes"]["kv_read"] > 0 and res["attention_backend"] == "gpu"
    assert len(bad) == 2 and all("max_position_embeddings" in r["error"] for r in bad)
    table = capsys.readouterr().out.strip().splitlines()
    assert "ms/step" in table[-6] and "x roofline" in table[-6] and "decode tuning" in table[-6]


def test_compiler_options_reach_the_loop(model, monkeypatch):
    """run_point compiles the loop with the options it is given (recorded),
    or with the model runner's own (models.compiler_options) when given
    none; the tokens do not depend on them here (CPU ignores GPU options)."""
    seen = []
    real_jit = jax.jit

    def spy(fn, **kwargs):
        if fn.__name__ == "loop":
            seen.append(kwargs.get("compiler_options"))
        return real_jit(fn, **kwargs)

    monkeypatch.setattr(step_ceiling.jax, "jit", spy)
    monkeypatch.setitem(models.base.COMPILER_OPTIONS, jax.default_backend(),
                        {"xla_gpu_enable_triton_gemm": False})
    given = {"xla_gpu_experimental_force_split_k": 1}
    res = [step_ceiling.run_point(model, num_seqs=2, context=5, steps=2, block_size=BS,
                                  repeats=1, warmup=0, compiler_options=options)
           for options in (given, None, {})]
    assert [r["compiler_options"] for r in res] == [
        given, {"xla_gpu_enable_triton_gemm": False}, {}]
    assert seen == [given, {"xla_gpu_enable_triton_gemm": False}, None]


def test_bench_step_flags():
    parse = script("bench_step").parse_args
    args = parse(["--model", "a,b", "--num-seqs", "1,2", "--context", "5", "--steps", "4"])
    assert args.points == [("a", 1, 5, 4), ("a", 2, 5, 4), ("b", 1, 5, 4), ("b", 2, 5, 4)]
    assert args.variant == ["full"]
    args = parse(["--point", "c:/x:y.json:8:16:2", "--variant", "no-attention-no-kv-write"])
    assert args.points == [("c:/x:y.json", 8, 16, 2)]
    args = parse(["--decode-tuning", "default", "--decode-tuning", "128/2/4"])
    assert args.tunings == [("default", {}), ("128/2/4", dict(chunk_tokens=128, num_warps=2,
                                                                num_stages=4))]
    args = parse(["--compiler-options", "default", "--compiler-options", "none",
                  "--compiler-options", "xla_gpu_experimental_force_split_k=1,"
                                        "xla_gpu_enable_triton_gemm=false,xla_x=abc"])
    assert args.option_sets == [
        ("default", None), ("none", {}),
        ("xla_gpu_experimental_force_split_k=1,xla_gpu_enable_triton_gemm=false,xla_x=abc",
         dict(xla_gpu_experimental_force_split_k=1, xla_gpu_enable_triton_gemm=False,
              xla_x="abc"))]
    for bad in (["--point", "llama-1.1b:256:512"], ["--variant", "fast"],
                ["--num-seqs", "a"], ["--decode-tuning", "64/2"],
                ["--compiler-options", "split_k=1"], ["--compiler-options", "xla_gpu_x"],
                ["--decode-tuning", "64/2/2", "--variant", "no-attention"]):
        with pytest.raises(SystemExit):
            parse(bad)


# ---------------------------------------------------------------- the profile


def test_profile_step_script(tmp_path, capsys):
    out = tmp_path / "profile.json"
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(LLAMA, num_hidden_layers=2)))
    assert script("profile_step").main([
        "--model", str(config), "--num-seqs", "3", "--context", "6", "--steps", "2",
        "--prefill-seqs", "2", "--prefill-len", "7", "--block-size", str(BS), "--calls", "2",
        "--out", str(out), "--trace-dir", str(tmp_path / "trace"), "--no-progress"]) == 0
    res = json.loads(out.read_text())
    assert res["command"].startswith("python scripts/profile_step.py") and res["device"]
    for kind, calls in (("decode", 1), ("prefill", 1)):
        d = res[kind]
        assert d["trace"]["plane"] == "/host:CPU" and d["trace"]["num_events"] > 0
        assert pathlib.Path(d["trace"]["file"]).is_file()
        assert d["wall_ms_per_step"] > 0 and d["device_us_per_step"] > 0
        cats = {c["category"] for c in d["categories"]}
        assert {"matmul", "attention", "kv write"} <= cats, cats
        groups = {g["group"]: g for g in d["groups"]}
        qkv = groups["layers_*/self_attn/qkv_proj/dot_general"]
        assert qkv["category"] == "matmul" and qkv["num_ops"] == 2  # one per layer
        assert qkv["calls_per_step"] == pytest.approx(2 * calls)
        tokens = 3 if kind == "decode" else 14
        assert qkv["flops_per_step"] == pytest.approx(2 * 2 * tokens * 64 * (6 + 2 * 2) * 10)
        assert sum(g["pct"] for g in d["groups"]) == pytest.approx(100)
    assert res["decode"]["K"] == 2 and res["prefill"]["num_tokens"] == 14
    text = capsys.readouterr().out
    assert "decode: wall" in text and "prefill: wall" in text and "op (all layers)" in text


# A GPU trace as jax.profiler writes it: kernels on "Stream" lines (hlo_op,
# hlo_module stats), the same ops again on the derived "XLA Ops" line, and a
# kernel of another module.
GPU_TRACE = """
planes {
  id: 1 name: "/device:GPU:0"
  lines { id: 1 name: "Stream #13(compute)" timestamp_ns: 1000
    events { metadata_id: 1 offset_ps: 0 duration_ps: 4000000
             stats { metadata_id: 1 str_value: "custom-call.7" }
             stats { metadata_id: 2 str_value: "jit_loop" } }
    events { metadata_id: 2 offset_ps: 5000000 duration_ps: 2000000
             stats { metadata_id: 1 str_value: "fusion.3" }
             stats { metadata_id: 2 str_value: "jit_loop" } }
    events { metadata_id: 3 offset_ps: 8000000 duration_ps: 3000000
             stats { metadata_id: 1 str_value: "custom-call.9" }
             stats { metadata_id: 2 str_value: "jit_loop" } }
    events { metadata_id: 4 offset_ps: 12000000 duration_ps: 1000000
             stats { metadata_id: 1 str_value: "custom-call.10" }
             stats { metadata_id: 2 str_value: "jit_loop" } }
    events { metadata_id: 2 offset_ps: 14000000 duration_ps: 9000000
             stats { metadata_id: 1 str_value: "fusion.1" }
             stats { metadata_id: 2 str_value: "jit_other" } } }
  lines { id: 2 name: "XLA Ops" timestamp_ns: 1000
    events { metadata_id: 5 offset_ps: 0 duration_ps: 4000000 } }
  event_metadata { key: 1 value { id: 1 name: "sm90_xmma_gemm_bf16bf16_bf16f32" } }
  event_metadata { key: 2 value { id: 2 name: "fusion_3" } }
  event_metadata { key: 3 value { id: 3 name: "paged_attention" } }
  event_metadata { key: 4 value { id: 4 name: "write_kv" } }
  event_metadata { key: 5 value { id: 5 name: "custom-call.7" } }
  stat_metadata { key: 1 value { id: 1 name: "hlo_op" } }
  stat_metadata { key: 2 value { id: 2 name: "hlo_module" } }
}
planes { id: 2 name: "/host:CPU" }
"""

# GPU-style optimized HLO: operand shapes inline, a cuBLAS gemm with its
# workspace, a Triton GEMM fusion, Pallas (Triton) calls reading / updating the pool.
GPU_HLO = """HloModule jit_loop, is_scheduled=true

%triton_gemm (param_0: bf16[256,2048], param_1: bf16[2048,2560]) -> bf16[256,2560] {
  %param_0 = bf16[256,2048]{1,0} parameter(0)
  %param_1 = bf16[2048,2560]{1,0} parameter(1)
  ROOT %dot.1 = bf16[256,2560]{1,0} dot(bf16[256,2048]{1,0} %param_0, bf16[2048,2560]{1,0} %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main.9 (x: bf16[256,2048], w: bf16[2048,2560], u: bf16[2048,5632], pool: bf16[2,100,4,16,64]) -> bf16[256,2560] {
  %x = bf16[256,2048]{1,0} parameter(0)
  %w = bf16[2048,2560]{1,0} parameter(1)
  %u = bf16[2048,5632]{1,0} parameter(2)
  %pool = bf16[2,100,4,16,64]{4,3,2,1,0} parameter(3)
  %q = bf16[256,32,64]{2,1,0} parameter(4)
  %bt = s32[256,33]{1,0} parameter(5)
  %k = bf16[256,4,64]{2,1,0} parameter(6)
  %custom-call.7 = (bf16[256,5632]{1,0}, s8[4194304]{0}) custom-call(bf16[256,2048]{1,0} %x, bf16[2048,5632]{1,0} %u), custom_call_target="__cublas$gemm", metadata={op_name="jit(loop)/while/body/LlamaForCausalLM/layers_3/mlp/gate_up_proj/dot_general"}, backend_config={"gemm_backend_config":{"alpha_real":1,"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]}}}
  %fusion.3 = bf16[256,2560]{1,0} fusion(bf16[256,2048]{1,0} %x, bf16[2048,2560]{1,0} %w), kind=kCustom, calls=%triton_gemm, metadata={op_name="jit(loop)/while/body/LlamaForCausalLM/layers_3/self_attn/qkv_proj/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %custom-call.9 = bf16[256,32,64]{2,1,0} custom-call(bf16[256,32,64]{2,1,0} %q, bf16[2,100,4,16,64]{4,3,2,1,0} %pool, s32[256,33]{1,0} %bt), custom_call_target="__gpu$xla.gpu.triton", metadata={op_name="jit(loop)/while/body/LlamaForCausalLM/layers_3/self_attn/pallas_call"}, backend_config={"name":"paged_attention","ir":"(x)","num_warps":4}
  %custom-call.10 = bf16[2,100,4,16,64]{4,3,2,1,0} custom-call(bf16[2,100,4,16,64]{4,3,2,1,0} %pool, bf16[256,4,64]{2,1,0} %k, bf16[256,4,64]{2,1,0} %k), custom_call_target="__gpu$xla.gpu.triton", output_to_operand_aliasing={{}: (0, {})}, backend_config={"name":"write_kv"}
  ROOT %while.2 = bf16[256,2560]{1,0} while(%fusion.3), condition=%c, body=%b
}
"""


def test_kernel_totals_of_a_whole_run(tmp_path):
    """An engine run's trace: device time per module and per kernel, the
    busiest first (the XLA Ops line not counted again)."""
    from jax.profiler import ProfileData
    path = tmp_path / "gpu.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(GPU_TRACE))
    t = step_profile.kernel_totals(path, limit=3)
    assert t["plane"] == "/device:GPU:0" and t["device_ms"] == pytest.approx(0.019)
    assert [(m["module"], m["calls"]) for m in t["modules"]] == [("jit_loop", 4), ("jit_other", 1)]
    assert [m["ms"] for m in t["modules"]] == pytest.approx([0.010, 0.009])
    assert [(k["module"], k["kernel"], k["calls"]) for k in t["kernels"]] == [
        ("jit_other", "fusion_3", 1), ("jit_loop", "sm90_xmma_gemm_bf16bf16_bf16f32", 1),
        ("jit_loop", "paged_attention", 1)]
    assert t["kernels"][0]["pct"] == pytest.approx(100 * 9 / 19)
    # kernels at 1-5, 6-8, 9-12, 13-14, 15-24 us: four 1 us launch gaps
    tl = t["timeline"]
    assert tl["span_ms"] == pytest.approx(0.023) and tl["busy_ms"] == pytest.approx(0.019)
    assert tl["busy_pct"] == pytest.approx(100 * 19 / 23)
    assert tl["gaps"]["under_10us"] == pytest.approx(dict(count=4, ms=0.004))
    assert tl["gaps"]["over_1ms"] == dict(count=0, ms=0.0)


def test_timeline_counts_overlaps_once_and_buckets_gaps():
    """Two streams' kernels overlapping count once; gaps of 50 us and 2 ms
    land in their buckets."""
    ev = lambda start_us, us: dict(start_ns=start_us * 1e3, duration_ns=us * 1e3)
    tl = step_profile.timeline({"a": [ev(0, 10), ev(60, 10)], "b": [ev(5, 10), ev(2070, 30)]})
    # busy: 0-15, 60-70, 2070-2100 us; gaps 45 us and 2000 us
    assert tl["busy_ms"] == pytest.approx(0.055) and tl["span_ms"] == pytest.approx(2.1)
    assert tl["gaps"]["10us_to_1ms"] == pytest.approx(dict(count=1, ms=0.045))
    assert tl["gaps"]["over_1ms"] == pytest.approx(dict(count=1, ms=2.0))
    assert tl["gaps"]["under_10us"] == dict(count=0, ms=0.0)
    assert step_profile.timeline({})["busy_ms"] == 0.0


def test_gpu_trace_and_hlo_reduce(tmp_path):
    from jax.profiler import ProfileData
    path = tmp_path / "gpu.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(GPU_TRACE))
    events, info = step_profile.kernel_events(path, "jit_loop")
    assert info["plane"] == "/device:GPU:0" and info["lines"] == ["Stream #13(compute)"]
    assert [e["hlo_op"] for e in events] == ["custom-call.7", "fusion.3", "custom-call.9",
                                             "custom-call.10"]
    assert info["modules"] == {"jit_loop": 4, "jit_other": 1}

    module = step_profile.parse_hlo(GPU_HLO)
    assert module.name == "jit_loop"
    gemm = module.instructions["custom-call.7"]
    assert gemm.operand_shapes[1].startswith("bf16[2048,5632]")
    pool = step_profile.PoolInfo(shape=(2, 100, 4, 16, 64), read_bytes=1e6,
                                 attention_flops=5e8)
    table = step_profile.reduce_trace(module, events, num_steps=2, pool=pool)
    ops = {o["op"]: o for o in table["ops"]}
    g = ops["custom-call.7"]
    assert g["category"] == "matmul" and g["flops"] == 2 * 256 * 5632 * 2048
    assert g["bytes"] == 2 * (256 * 2048 + 2048 * 5632 + 256 * 5632)  # workspace left out
    assert g["us_per_step"] == pytest.approx(2.0) and g["calls_per_step"] == 0.5
    assert g["kernels"] == ["sm90_xmma_gemm_bf16bf16_bf16f32"]
    assert g["group"] == "layers_*/mlp/gate_up_proj/dot_general"
    assert g["tflop_per_s"] == pytest.approx(g["flops"] * 0.5 / 2e-6 / 1e12)
    assert ops["fusion.3"]["flops"] == 2 * 256 * 2560 * 2048
    att = ops["custom-call.9"]
    assert att["category"] == "attention" and att["flops"] == 5e8
    assert att["bytes"] == 2 * 256 * 32 * 64 * 2 + 256 * 33 * 4 + 1e6
    kv = ops["custom-call.10"]
    assert kv["category"] == "kv write" and kv["bytes"] == 2 * 2 * 256 * 4 * 64 * 2
    assert {c["category"] for c in table["categories"]} == {"matmul", "attention", "kv write"}
    assert table["device_us_per_step"] == pytest.approx((4 + 2 + 3 + 1) / 2)


def test_an_op_of_two_kernels_counts_its_flops_once_per_run():
    """A GEMM that runs as two kernels (its split-K reduction beside it):
    two launches a run, its bytes and FLOPs once."""
    module = step_profile.parse_hlo(GPU_HLO)
    events = [dict(hlo_op="custom-call.7", kernel=k, duration_ns=ns)
              for _ in range(2) for k, ns in (("gemm_splitk", 3000.0), ("splitk_reduce", 1000.0))]
    table = step_profile.reduce_trace(module, events, num_steps=2)
    (g,) = table["ops"]
    assert g["calls_per_step"] == 2 and g["runs_per_step"] == 1
    assert g["us_per_step"] == pytest.approx(4.0)
    assert g["tflop_per_s"] == pytest.approx(g["flops"] / 4e-6 / 1e12)
    (group,) = table["groups"]
    assert group["calls_per_step"] == 2 and group["flops_per_step"] == g["flops"]


def test_tpu_style_ops_line(tmp_path):
    """A plane without Stream lines: its "XLA Ops" events, named after the op."""
    from jax.profiler import ProfileData
    trace = """planes { id: 1 name: "/device:TPU:0"
      lines { id: 1 name: "XLA Ops" timestamp_ns: 0
        events { metadata_id: 1 offset_ps: 0 duration_ps: 1000000 } }
      lines { id: 2 name: "XLA Modules" timestamp_ns: 0
        events { metadata_id: 2 offset_ps: 0 duration_ps: 2000000 } }
      event_metadata { key: 1 value { id: 1 name: "fusion.3" } }
      event_metadata { key: 2 value { id: 2 name: "jit_loop(1)" } } }"""
    path = tmp_path / "tpu.xplane.pb"
    path.write_bytes(ProfileData.text_proto_to_serialized_xspace(trace))
    events, info = step_profile.kernel_events(path, "jit_loop")
    assert info["lines"] == ["XLA Ops"]
    assert events == [dict(hlo_op="fusion.3", kernel="fusion.3", duration_ns=1000.0,
                           start_ns=0.0)]
