"""A stage's console shows its own lines; Ray's logs (operator metrics, worker output, native stderr)
land in the log file under out/logs, and also on the console with --verbose."""

import subprocess
import sys
import textwrap

import pytest

# A stage in miniature, run as its own driver process joined to the suite's cluster.
STAGE = textwrap.dedent("""
    import logging, os, sys, warnings
    from pathlib import Path

    import ray
    import ray.data

    from lowlight import console
    from lowlight.config import RayConfig
    from lowlight.raycluster import ensure_ray

    log = console.start("probe", verbose=sys.argv[3] == "1", log_dir=Path(sys.argv[1]))
    print(f"log: {log}")
    ensure_ray(RayConfig(address=sys.argv[2]))

    @ray.remote
    def shout():
        print("a worker speaks")

    ray.get(shout.remote())
    ray.data.range(40, override_num_blocks=4).map_batches(lambda b: b).materialize()
    os.write(2, b"native stderr below Python\\n")
    warnings.warn("a library warns")
    print("stage done: 40 rows")
    ray.shutdown()
""")

RAY_INTERNALS = ("Operator Metrics", "Execution plan of Dataset", "a worker speaks", "native stderr below Python",
                 "a library warns")


def run_stage(tmp_path, address: str, verbose: bool) -> tuple[str, str]:
    done = subprocess.run([sys.executable, "-c", STAGE, str(tmp_path / "logs"), address, "1" if verbose else "0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    console = done.stdout + done.stderr
    log_line = next(line for line in done.stdout.splitlines() if line.startswith("log: "))
    return console, (tmp_path / log_line.removeprefix("log: ")).read_text()


@pytest.fixture(scope="module")
def address(ray_local):
    return ray_local.get_runtime_context().gcs_address


def test_quiet_console_shows_the_stage_and_the_log_file_has_ray(tmp_path, address):
    console, log = run_stage(tmp_path, address, verbose=False)
    assert console.splitlines() == [next(iter(console.splitlines())), "stage done: 40 rows"], console
    for text in RAY_INTERNALS:
        assert text in log, f"{text!r} missing from the log file:\n{log[-3000:]}"
    assert "{'" in log.split("Operator Metrics", 1)[1][:200]  # the operator-stats dict itself


def test_verbose_console_shows_ray_too(tmp_path, address):
    console, log = run_stage(tmp_path, address, verbose=True)
    for text in ("a worker speaks", "native stderr below Python", "Execution plan of Dataset", "stage done"):
        assert text in console, f"{text!r} missing from the verbose console:\n{console[-3000:]}"
    assert "a worker speaks" in log and "Operator Metrics" in log
