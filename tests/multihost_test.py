"""Multi-host: two real JAX processes on localhost agree with one process.

Two subprocesses (JAX_PLATFORMS=cpu, one CPU device each) join through
`distributed.initialize`, driven by the RECONTRAST_* environment variables and
a free local port, and use gloo for the cross-process collectives. They train a
few ReContrast steps of a tiny model, each process feeding only its rows of the
same global batches, and evaluate the embedded test set. The reference is ONE
process with two simulated devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=2`): same global batches,
same mesh size, so loss, parameters and scores must agree to float32 noise.
The test order is checked against a naive loop that scores each test image on
its own, in the order of the sample list.

Adam eps is 1e-4 for the reason given in multidevice_test.py (with 1e-8, Adam
amplifies gradient entries that are zero up to summation-order noise).

If the two-process run fails and two processes cannot even run a one-line
collective here (no loopback networking, no gloo), the test is skipped and
prints why; if the probe works, the failure is reported as a failure.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from recontrast_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = textwrap.dedent(
    """
    import jax, numpy as np
    from recontrast_jax import distributed, parallel
    distributed.initialize()
    mesh = parallel.make_mesh()
    local = np.full((1, 2), jax.process_index() + 1.0, np.float32)
    total = jax.jit(lambda x: x.sum(0))(parallel.global_batch(mesh, {"x": local})["x"])
    assert float(parallel.to_host(total)[0]) == 3.0
    """
)

WORKER = textwrap.dedent(
    """
    import sys
    import jax, numpy as np
    from recontrast_jax import checkpointing, default_config, distributed, evaluate, parallel
    from recontrast_jax.methods import recontrast as recontrast_method
    from recontrast_jax.data import folder, input_pipeline

    out, data_root, ckpt_dir = sys.argv[1:4]
    naive = sys.argv[4] == "naive"
    launch = distributed.initialize()
    assert jax.device_count() == 2, jax.devices()
    config = default_config.get_config()
    config.model.arch = "resnet_tiny"
    config.data.image_size = config.data.crop_size = 32
    config.train.steps = 20
    config.optimizer.eps = 1e-4
    config.eval.batch_size = 3  # padded to 4 rows for the 2 devices
    mesh = parallel.make_mesh()
    tx = recontrast_method.make_optimizer(config.optimizer)
    # Jitted: one compilation instead of one per initialiser op.
    state = jax.jit(lambda key: recontrast_method.create_train_state("resnet_tiny", 32, tx, key))(
        jax.random.key(0))
    state = parallel.replicate(mesh, state)
    step = recontrast_method.compile_train_step(config, tx, mesh, encoder_train=True)
    rng = np.random.default_rng(0)
    losses, rows_fed = [], []
    for _ in range(3):
        images = rng.normal(size=(4, 32, 32, 3)).astype(np.float32)
        local = parallel.process_part(mesh, images)
        rows_fed.append(len(local))
        batch = parallel.global_batch(mesh, {"image": local})
        state, metrics = step(state, batch["image"])
        losses.append(float(metrics["loss"]))
    # Every process takes part in saving; evaluation uses the restored state.
    ckpt = checkpointing.manager(ckpt_dir)
    checkpointing.save(ckpt, 3, state)
    state = checkpointing.restore(ckpt, state, 3)
    params = jax.tree_util.tree_leaves((state.params, state.batch_stats))
    params = [parallel.to_host(p) for p in params]
    samples = folder.scan_category(data_root, "brick").test
    predict_fn = recontrast_method.compile_predict(config, mesh)
    result = evaluate.evaluate_split(predict_fn, state, samples, config, mesh)
    saved = dict(
        losses=np.array(losses), rows_fed=np.array(rows_fed),
        scores=result.scores, maps=result.maps, labels=result.labels,
        process=np.array([jax.process_index(), jax.process_count()]),
        method=np.array(launch.method),
    )
    if naive:  # each test image alone, in the order of the sample list
        alone = []
        for sample in samples:
            image = input_pipeline.preprocess_image(
                folder.load_sample_image(sample), 32, 32)
            pair = np.stack([image, np.zeros_like(image)])
            alone.append(float(np.asarray(predict_fn(
                state, parallel.global_batch(mesh, {"image": pair})["image"])[1])[0]))
        saved["naive_scores"] = np.array(alone)
        saved["naive_labels"] = np.array([s.label for s in samples])
    np.savez(out, *params, **saved)
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECONTRAST_")}
    for name in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        env.pop(name, None)  # this test launches its own processes
    # XLA_FLAGS stays conftest's (LLVM optimisation off), the same on both sides.
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return env


def run_two_processes(script: str, args_of, timeout: float):
    """Runs `script` as processes 0 and 1 of a 2-process job on localhost.

    If one process fails, the other is killed rather than left waiting for its
    peer in a collective.

    Returns:
      (whether both succeeded, the tail of each process's output).
    """
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for pid in range(2):
        env = dict(
            base_env(),
            RECONTRAST_COORDINATOR=address,
            RECONTRAST_NUM_PROCESSES="2",
            RECONTRAST_PROCESS_ID=str(pid),
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", script, *args_of(pid)],
                env=env,
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    deadline = time.monotonic() + timeout
    while any(p.poll() is None for p in procs):
        failed = any(p.returncode not in (None, 0) for p in procs)
        if failed or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        time.sleep(0.1)
    outputs = [p.communicate()[0] for p in procs]
    ok = all(p.returncode == 0 for p in procs)
    tail = "\n".join(f"[process {i}] " + o[-1500:] for i, o in enumerate(outputs))
    return ok, tail


def run_one_process(script: str, args) -> None:
    """Runs `script` as a single process with two simulated CPU devices."""
    env = base_env()
    env["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
    subprocess.run(
        [sys.executable, "-c", script, *args],
        env=env,
        cwd=REPO,
        check=True,
        timeout=120,
    )


def skip_if_cpu_collectives_fail() -> None:
    """Skips (printing why) when two processes cannot even add two numbers."""
    ok, tail = run_two_processes(PROBE, lambda pid: [], timeout=60)
    if not ok:
        reason = "two JAX CPU processes cannot run collectives here:\n" + tail
        print(reason)
        pytest.skip(reason)


def max_difference(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())


def test_two_processes_train_and_evaluate_like_one(tmp_path, tiny_dataset):
    start = time.perf_counter()
    data = str(tiny_dataset)
    ok, tail = run_two_processes(
        WORKER,
        lambda pid: [str(tmp_path / f"multi_{pid}.npz"), data,
                     str(tmp_path / "ckpt_multi"), "-"],
        timeout=150,
    )  # fmt: skip
    if not ok:  # a broken environment skips; a broken library fails
        skip_if_cpu_collectives_fail()
    assert ok, tail
    two_seconds = time.perf_counter() - start
    args = [str(tmp_path / "single.npz"), data, str(tmp_path / "ckpt_single"), "naive"]
    run_one_process(WORKER, args)
    print(f"2 processes: {two_seconds:.1f} s, then 1 process: "
          f"{time.perf_counter() - start - two_seconds:.1f} s")  # fmt: skip
    single = np.load(tmp_path / "single.npz")
    assert single["process"].tolist() == [0, 1]
    assert str(single["method"]) == "single"
    param_names = [n for n in single.files if n.startswith("arr_")]
    assert len(param_names) > 10
    for pid in range(2):
        multi = np.load(tmp_path / f"multi_{pid}.npz")
        assert multi["process"].tolist() == [pid, 2]
        assert str(multi["method"]) == "explicit"
        assert multi["rows_fed"].tolist() == [2, 2, 2]  # half of each batch of 4
        loss_diff = max_difference(multi["losses"], single["losses"])
        param_diff = max(max_difference(multi[n], single[n]) for n in param_names)
        print(f"process {pid}: max |loss diff| = {loss_diff:.3g}, "
              f"max |param diff| = {param_diff:.3g}")  # fmt: skip
        assert loss_diff < 1e-5
        assert param_diff < 1e-5
        # Every test image exactly once, in the order of the sample list.
        np.testing.assert_array_equal(multi["labels"], single["naive_labels"])
        assert multi["scores"].shape == single["naive_scores"].shape == (8,)
        score_diff = max_difference(multi["scores"], single["scores"])
        map_diff = max_difference(multi["maps"], single["maps"])
        print(f"process {pid}: max |score diff| = {score_diff:.3g}, "
              f"max |map diff| = {map_diff:.3g}")  # fmt: skip
        assert score_diff < 1e-5
        assert map_diff < 1e-5
        np.testing.assert_allclose(
            multi["scores"], single["naive_scores"], rtol=1e-5, atol=1e-6
        )


# ----------------------------------------------------------------------------
# Launch detection (no processes started)


def detect(environ, **kwargs):
    return distributed.detect(environ=environ, on_tpu_vm=False, **kwargs)


def test_plain_process_is_single():
    assert detect({}) == distributed.Launch("single")
    assert detect({"SLURM_NTASKS": "1"}).method == "single"
    assert detect({"OMPI_COMM_WORLD_SIZE": "1"}).method == "single"


def test_explicit_flags_win_over_environment():
    env = {
        distributed.ENV_COORDINATOR: "10.0.0.9:99",
        distributed.ENV_NUM_PROCESSES: "8",
        distributed.ENV_PROCESS_ID: "7",
        "SLURM_NTASKS": "4",
    }
    assert detect(env) == distributed.Launch("explicit", "10.0.0.9:99", 8, 7)
    launch = detect(
        env, coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1
    )
    assert launch == distributed.Launch("explicit", "10.0.0.1:1234", 2, 1)


def test_cluster_launchers_are_detected():
    assert detect({"SLURM_NTASKS": "4"}) == distributed.Launch("slurm", None, 4)
    assert detect({"OMPI_COMM_WORLD_SIZE": "3"}).method == "ompi"
    tpu = distributed.detect(environ={}, on_tpu_vm=True)
    assert tpu.method == "tpu"
    assert detect({"SLURM_NTASKS": "4"}, mode="off").method == "single"
    assert detect({distributed.ENV_MODE: "on"}).method == "jax-auto"


def test_incomplete_or_bad_settings_are_named():
    with pytest.raises(
        distributed.DistributedSetupError, match="RECONTRAST_PROCESS_ID"
    ):
        detect({}, coordinator_address="10.0.0.1:1234", num_processes=2)
    with pytest.raises(distributed.DistributedSetupError, match=r"process_id=2"):
        detect({}, coordinator_address="h:1", num_processes=2, process_id=2)
    with pytest.raises(distributed.DistributedSetupError, match="host:port"):
        detect({}, coordinator_address="h", num_processes=2, process_id=0)
    with pytest.raises(distributed.DistributedSetupError, match="integer"):
        detect({distributed.ENV_NUM_PROCESSES: "two"})
    with pytest.raises(distributed.DistributedSetupError, match="not one of"):
        detect({}, mode="sometimes")


PREEMPTED = textwrap.dedent(
    """
    import sys, time
    from recontrast_jax import checkpointing, distributed, preemption
    distributed.initialize()
    manager = checkpointing.manager(sys.argv[1])
    with preemption.StopRequest() as stop:
        for step in range(1, 3000):
            time.sleep(0.02)  # a training step
            if step == 10:
                print("running", flush=True)
            if stop.reached(step, manager):
                print(f"stopped after step {step} on {stop.signal_name}", flush=True)
                break
    """
)


def test_sigterm_to_one_process_stops_both_at_the_same_step(tmp_path):
    """JAX's preemption sync point through `StopRequest`: only process 1 gets
    the signal, and both stop after the same step."""
    address = f"127.0.0.1:{free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PREEMPTED, str(tmp_path / "ckpt")],
            env=dict(
                base_env(),
                RECONTRAST_COORDINATOR=address,
                RECONTRAST_NUM_PROCESSES="2",
                RECONTRAST_PROCESS_ID=str(pid),
            ),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )  # fmt: skip
        for pid in range(2)
    ]
    try:
        for proc in procs:
            seen = []  # gloo's connection lines come first
            while not seen or seen[-1] not in ("running\n", ""):  # "": it ended
                seen.append(proc.stdout.readline())
            if seen[-1] == "":
                pytest.skip(f"two processes cannot start here: {''.join(seen)[-500:]}")
        procs[1].send_signal(signal.SIGTERM)
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    stops = [re.findall(r"stopped after step (\d+)", out) for out in outputs]
    assert all(len(s) == 1 for s in stops), outputs
    assert stops[0] == stops[1], outputs
    assert 10 <= int(stops[0][0]) < 2999
    assert [proc.returncode for proc in procs] == [0, 0], outputs
