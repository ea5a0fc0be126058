"""The host core imports no jax (nor flax/transformers): it is tested in milliseconds."""
import subprocess
import sys

HOST_MODULES = ["jpaged", "jpaged.config", "jpaged.sampling_params", "jpaged.sequence",
                "jpaged.block_allocator", "jpaged.block_manager", "jpaged.scheduler",
                "jpaged.inputs", "jpaged.interrupts", "jpaged.stats", "jpaged.engine_args",
                "jpaged.slots", "jpaged.outputs", "jpaged.beam_search",
                # the engine layer's host-only modules (docs/architecture.md)
                "jpaged.output_processor", "jpaged.detokenizer",
                # the harness's host side: the Orca baseline and the workloads
                "jpaged.bench", "jpaged.bench.reservation", "jpaged.bench.workloads"]


def test_host_core_imports_without_jax():
    code = (
        "import sys\n"
        f"for name in {HOST_MODULES!r}:\n"
        "    __import__(name)\n"
        "from jpaged import SamplingParams, EngineConfig\n"
        "SamplingParams(n=2, temperature=0.5); EngineConfig()\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib', 'flax', 'transformers'))\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
