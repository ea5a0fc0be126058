"""One background lane for the session's slow subprocess work.

The tests leave one of CI's two cores mostly idle (a warm-up compiles one
step at a time), so a test module whose assertions are on a subprocess's
output queues that subprocess here from its start_early(items) (called by
tests/conftest.py once the session's tests are collected, with the module's
selected items): the jobs run one after another, in the order queued,
beside the tests before theirs, and a test waits for its job's result.
"""
from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import tempfile
import threading
import time

_LANE = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="background")
_PROCS: list[subprocess.Popen] = []
_LOCK = threading.Lock()
_STOPPED = threading.Event()


def cpu_env(num_devices: int, **overrides) -> dict:
    """This process's environment for a subprocess whose jax sees
    num_devices virtual CPU devices (plus `overrides`)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **overrides)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={num_devices}").strip()
    return env


def distributed_commands(cmd, num_processes: int, num_devices: int) -> list:
    """run_processes' commands for one jax.distributed run of `cmd` on this
    machine: num_processes processes of num_devices CPU devices each,
    joined through JAX_COORDINATOR_ADDRESS at a free local port."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = cpu_env(num_devices, JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
                  JAX_NUM_PROCESSES=str(num_processes))
    return [(cmd, dict(env=dict(env, JAX_PROCESS_ID=str(i)))) for i in range(num_processes)]


def submit(fn, *args, **kwargs) -> concurrent.futures.Future:
    """Queues fn(*args, **kwargs) (which runs its processes through
    run_processes) in the lane; returns the Future of its result."""
    return _LANE.submit(fn, *args, **kwargs)


def run(cmd, *, timeout: float, **popen_kwargs) -> concurrent.futures.Future:
    """Queues one command (Popen's keywords: env, cwd): a Future of its
    subprocess.CompletedProcess."""
    return submit(lambda: run_processes([(cmd, popen_kwargs)], timeout=timeout)[0])


def run_processes(commands, *, timeout: float) -> list[subprocess.CompletedProcess]:
    """Runs [(cmd, Popen keywords), ...] side by side (the processes of one
    distributed run, say), waits for all; stdout and stderr as text, through
    temporary files (a pipe nobody reads while it waits on another process
    could fill and stall its writer). Those still running `timeout` seconds
    after the start are killed (returncode negative, stderr says so)."""
    if _STOPPED.is_set():
        raise RuntimeError("the background lane was stopped")
    procs, files = [], []
    with _LOCK:
        for cmd, kwargs in commands:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            files.append((out, err))
            procs.append(subprocess.Popen(cmd, stdout=out, stderr=err, text=True, **kwargs))
        _PROCS.extend(procs)
    deadline = time.monotonic() + timeout
    done = []
    try:
        for (cmd, _), proc, (out, err) in zip(commands, procs, files):
            note = ""
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                note = f"\n[background] killed after {timeout} s"
            out.seek(0)
            err.seek(0)
            done.append(subprocess.CompletedProcess(cmd, proc.returncode, out.read(),
                                                    err.read() + note))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for pair in files:
            for f in pair:
                f.close()
        with _LOCK:
            for proc in procs:
                _PROCS.remove(proc)
    return done


def stop() -> None:
    """Drops the queued jobs and kills the running ones (the session ended
    before their tests)."""
    _STOPPED.set()
    _LANE.shutdown(wait=False, cancel_futures=True)
    with _LOCK:
        for proc in _PROCS:
            if proc.poll() is None:
                proc.kill()
