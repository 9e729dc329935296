"""`distmlp submit/status/logs/stop/jobs` against a real `ray start --head` on 127.0.0.1.

The head runs in its own session with its own temp dir and its own HOME (so its auth token
is not the user's ~/.ray/auth_token); Ray is kept on loopback by
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (else it swaps 127.0.0.1 for the machine's address).
Everything it started is ended by SIGTERM to `ray start --block`, then by process group.
"""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distmlp import jobs_api
from distmlp.cli import app

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART = ROOT / "jobs" / "quickstart.toml"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(home):
    """This environment without RAY_* settings, with HOME=home and the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    return env


def wait_http(url, timeout_s, proc):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the server is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout_s} s")


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A real Ray head with the dashboard (Jobs API) on 127.0.0.1 and token auth on."""
    home = tmp_path_factory.mktemp("home")
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    temp_dir = tmp_path_factory.mktemp("ray")
    env = clean_env(home)
    dashboard = free_port()
    ports = {"--port": free_port(), "--dashboard-port": dashboard,
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--runtime-env-agent-port": free_port(), "--metrics-export-port": free_port(),
             "--ray-client-server-port": free_port()}
    cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address", "127.0.0.1",
           "--dashboard-host", "127.0.0.1", "--num-cpus", "2", "--disable-usage-stats",
           "--temp-dir", str(temp_dir)]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    log = open(temp_dir / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dashboard}"
    try:
        wait_http(url, 90, proc)
        yield {"url": url, "env": env, "home": home}
    finally:
        proc.send_signal(signal.SIGTERM)  # --block: ray start stops what it started
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # anything left in the head's session
        except ProcessLookupError:
            pass
        log.close()


def distmlp(head, *args, timeout=180, env=None, cwd=ROOT):
    return subprocess.run([str(BIN / "distmlp"), *args], env=env or head["env"], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


def test_quickstart_succeeds_and_its_logs_end_with_the_summary(head):
    r = distmlp(head, "submit", str(QUICKSTART), "--address", head["url"], "--wait", "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])  # stdout is only the JSON line
    assert len(r.stdout.strip().splitlines()) == 1
    assert out["status"] == "SUCCEEDED" and out["address"] == head["url"]
    job_id = out["job_id"]
    assert job_id.startswith("distmlp-quickstart-")
    assert "step 1250/1250" in r.stderr  # the followed logs went to stderr

    st = distmlp(head, "status", job_id, "--json", env={**head["env"], "RAY_ADDRESS": head["url"]})
    assert st.returncode == 0, st.stderr
    assert json.loads(st.stdout)["status"] == "SUCCEEDED"
    logs = distmlp(head, "logs", job_id, "-a", head["url"])
    summary = json.loads(logs.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 1250 and summary["workers"] == 2
    assert summary["test_accuracy"] > 0.88
    listed = distmlp(head, "jobs", "-a", head["url"], "--json")
    assert job_id in [j["job_id"] for j in json.loads(listed.stdout)]

    # the run outlives the job's working dir: ~/distmlp-runs/<job id> on the head, plottable
    run_dir = head["home"] / "distmlp-runs" / job_id
    assert summary["run_dir"] == str(run_dir)
    png = run_dir.parent / "curves.png"
    plotted = distmlp(head, "plot", str(run_dir), "-o", str(png))
    assert plotted.returncode == 0, plotted.stderr
    assert png.read_bytes().startswith(b"\x89PNG")


def test_failing_job_is_failed_and_exits_nonzero(head):
    # a batch larger than the 8,000 training digits passes the job file check, fails on the cluster
    r = distmlp(head, "submit", str(QUICKSTART), "-a", head["url"], "--set", "optimizer.batch_size=9000",
                "--wait")
    assert r.returncode == 1
    assert r.stdout.strip().splitlines()[0].startswith("submitted distmlp-quickstart-")
    assert "larger than the 8000 training examples" in r.stdout
    assert r.stdout.strip().endswith("job failed")


def test_running_job_can_be_stopped(head):
    r = distmlp(head, "submit", str(QUICKSTART), "-a", head["url"], "--set", "run.epochs=200")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[-1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        st = json.loads(distmlp(head, "status", job_id, "-a", head["url"], "--json").stdout)
        if st["status"] == "RUNNING":
            break
        time.sleep(1)
    assert st["status"] == "RUNNING"
    stopped = distmlp(head, "stop", job_id, "-a", head["url"])
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"{job_id} STOPPED"
    follow = distmlp(head, "logs", job_id, "-a", head["url"], "--follow")
    assert follow.returncode == 1 and "job stopped" in follow.stderr


def test_client_without_the_token_gets_one_line_help(head, tmp_path):
    r = distmlp(head, "jobs", "-a", head["url"], env=clean_env(tmp_path))  # a HOME without a token
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "requires a Ray auth token" in r.stderr and "~/.ray/auth_token" in r.stderr


def test_token_from_env_var_works_and_a_wrong_one_is_rejected(head, tmp_path):
    token = (head["home"] / ".ray" / "auth_token").read_text()
    ok = distmlp(head, "jobs", "-a", head["url"], env={**clean_env(tmp_path), "RAY_AUTH_TOKEN": token})
    assert ok.returncode == 0, ok.stderr
    bad = distmlp(head, "jobs", "-a", head["url"], env={**clean_env(tmp_path), "RAY_AUTH_TOKEN": "0" * 64})
    assert bad.returncode == 2 and "rejected the Ray auth token" in bad.stderr


def test_unknown_job_id_and_unreachable_address_are_one_line_errors(head):
    r = distmlp(head, "status", "no-such-job", "-a", head["url"])
    assert r.returncode == 2 and "no-such-job does not exist" in r.stderr and "Traceback" not in r.stderr
    r = distmlp(head, "jobs", "-a", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in r.stderr


# ---- no cluster needed: parsing, safety checks, packaging ----

runner = CliRunner()


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """No token anywhere, and any attempt to build a Jobs API client fails the test."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a Jobs API client was created")
    import ray.job_submission
    monkeypatch.setattr(ray.job_submission, "JobSubmissionClient", refuse)


def test_non_loopback_http_without_token_is_refused_before_any_request(no_network):
    r = runner.invoke(app, ["jobs", "--address", "http://192.0.2.77:8265"])
    assert r.exit_code == 2
    assert "refusing plain http" in r.output and "--insecure" in r.output


def test_missing_address_and_bad_addresses(no_network):
    r = runner.invoke(app, ["jobs"])
    assert r.exit_code == 2 and "set RAY_ADDRESS" in r.output
    for bad in ("ray://127.0.0.1:10001", "auto", "http://127.0.0.1:port", "ftp://127.0.0.1"):
        r = runner.invoke(app, ["status", "x", "--address", bad])
        assert r.exit_code == 2, bad
        assert r.output.startswith("error: address"), r.output


def test_bad_job_file_or_set_fails_before_contacting_the_cluster(no_network, tmp_path):
    r = runner.invoke(app, ["submit", str(tmp_path / "missing.toml"), "-a", "http://127.0.0.1:9"])
    assert r.exit_code == 2 and "no such job file" in r.output
    r = runner.invoke(app, ["submit", str(QUICKSTART), "-a", "http://127.0.0.1:9", "--set", "optimizer.lr"])
    assert r.exit_code == 2 and "expected section.key=value" in r.output
    r = runner.invoke(app, ["submit", str(QUICKSTART), "--set", "optimizer.nope=1"])
    assert r.exit_code == 2 and "optimizer.nope" in r.output


def test_every_command_has_an_example_in_its_help():
    for cmd in ("submit", "status", "logs", "stop", "jobs", "plot"):
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Example: distmlp " + cmd in r.output, cmd


def test_check_safe_rules():
    for url in ("http://127.0.0.1:8265", "http://127.8.9.10:8265", "http://localhost:8265", "http://[::1]:8265",
                "https://ray.example.org", "https://192.0.2.7:8265"):
        jobs_api.check_safe(url)
    for url in ("http://192.0.2.7:8265", "http://ray.example.org:8265", "http://[2001:db8::1]:8265",
                "http://localhost.example.org:8265", "http://0.0.0.0:8265"):
        jobs_api.check_safe(url, insecure=True)
        with pytest.raises(jobs_api.JobsError, match="refusing plain http") as e:
            jobs_api.check_safe(url)
        assert "\n" not in str(e.value) and url in str(e.value)


def test_a_token_does_not_make_plain_http_to_another_machine_acceptable(no_network, tmp_path):
    token = tmp_path / "tok"
    token.write_text("c" * 64)
    for env in ({"RAY_AUTH_TOKEN": "c" * 64}, {"RAY_AUTH_TOKEN_PATH": str(token)}):
        r = runner.invoke(app, ["jobs", "--address", "http://192.0.2.77:8265"], env=env)
        assert r.exit_code == 2
        assert "refusing plain http" in r.output and "--insecure" in r.output


def test_auth_headers_follow_rays_token_sources(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    assert jobs_api.auth_headers() == {}
    with pytest.raises(jobs_api.JobsError, match="no Ray auth token was found"):
        jobs_api.auth_headers({"RAY_AUTH_MODE": "token"})
    token_file = tmp_path / "tok"
    token_file.write_text("a" * 64)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_file))
    assert jobs_api.auth_headers() == {"authorization": "Bearer " + "a" * 64}
    assert jobs_api.auth_headers({"RAY_AUTH_MODE": "disabled"}) == {}
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("b" * 64)
    assert jobs_api.auth_headers() == {"authorization": "Bearer " + "b" * 64}


def make_tree(root, files):
    for rel, size in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))


def test_package_job_only_and_with_a_filtered_workdir(tmp_path):
    work = tmp_path / "proj"
    make_tree(work, {"jobs/a.toml": 10, "notes.md": 10, "data/big.bin": 100, "runs/x/m.json": 10,
                     ".git/HEAD": 10, "pkg/__pycache__/m.pyc": 10, ".venv/bin/python": 10, "pkg/m.py": 10})
    job = work / "jobs" / "a.toml"
    job.write_text('[run]\nname = "a"\n')

    only = jobs_api.package(job, ["run.steps=3"], out_dir=tmp_path)
    assert zipfile.ZipFile(only.zip_path).namelist() == ["a.toml"]
    assert only.entrypoint == "distmlp train a.toml --address auto --json --set run.steps=3"
    in_home = jobs_api.package(job, out_dir=tmp_path, home_run_dir="distmlp-runs/a b")
    assert in_home.entrypoint == """distmlp train a.toml --address auto --json --run-dir "$HOME"/'distmlp-runs/a b'"""

    full = jobs_api.package(job, workdir=work, out_dir=tmp_path)
    assert sorted(zipfile.ZipFile(full.zip_path).namelist()) == ["jobs/a.toml", "notes.md", "pkg/m.py"]
    assert full.entrypoint == "distmlp train jobs/a.toml --address auto --json"

    outside = tmp_path / "b.toml"
    outside.write_text("")
    names = zipfile.ZipFile(jobs_api.package(outside, workdir=work, out_dir=tmp_path).zip_path).namelist()
    assert "b.toml" in names and "pkg/m.py" in names


def test_package_over_the_limit_says_so_in_one_line(tmp_path):
    make_tree(tmp_path / "proj", {"weights.bin": 50_000})
    job = tmp_path / "proj" / "a.toml"
    job.write_text("")
    with pytest.raises(jobs_api.JobsError) as e:
        jobs_api.package(job, workdir=tmp_path / "proj", out_dir=tmp_path, limit=10_000)
    assert "over Ray's limit" in str(e.value) and "\n" not in str(e.value)
    assert jobs_api.upload_limit() == 512 * 2**20
