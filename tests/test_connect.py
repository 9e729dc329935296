"""The embedded local Ray that connect() starts."""

import json
import os
import subprocess
import sys

from distmlp import connect


def test_quick_retries_keep_values_the_user_set(monkeypatch):
    name, other = list(connect.CONNECT_RETRY)
    monkeypatch.setenv(name, "250")
    monkeypatch.delenv(other, raising=False)
    connect.quick_retries()
    assert os.environ[name] == "250"
    assert os.environ[other] == connect.CONNECT_RETRY[other]


def test_the_embedded_rays_processes_retry_connections_20_ms_apart(tmp_path):
    """Ray itself (a worker's system config) reads the settings, not only the environment: a Ray
    that renamed them would fail here. In a subprocess: the test session has its own Ray."""
    script = ("import json, ray\n"
              "from distmlp import connect\n"
              "connect.connect(None, num_cpus=1)\n"
              "@ray.remote\n"
              "def config():\n"
              "    c = ray._raylet.Config\n"
              "    return c.raylet_client_connect_timeout_milliseconds(), c.raylet_client_num_connect_attempts()\n"
              "print(json.dumps(ray.get(config.remote())))\n"
              "connect.disconnect()\n")
    env = {k: v for k, v in os.environ.items() if k not in connect.CONNECT_RETRY}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    timeout_ms, attempts = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (timeout_ms, attempts) == (20, 500)
    assert timeout_ms * attempts == 1000 * 10  # Ray's own budget of tries: 10 a second apart
