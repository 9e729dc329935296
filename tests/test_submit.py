"""`distmlp submit/status/logs/stop/jobs`, and `distmlp train --address HOST:PORT`, against a real
`ray start --head` on 127.0.0.1.

The head runs in its own session with its own temp dir and its own HOME (so its auth token
is not the user's ~/.ray/auth_token); Ray is kept on loopback by
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (else it swaps 127.0.0.1 for the machine's address).
Everything it started is ended by SIGTERM to `ray start --block`, then by process group.
"""

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from typer.testing import CliRunner

from benchmarks.localcluster import free_port, stop_node
from distmlp import jobs_api
from distmlp.cli import app
from test_upload import EXPECTED, hostile_tree

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
QUICKSTART = ROOT / "jobs" / "quickstart.toml"


def clean_env(home):
    """This environment without RAY_* settings, with HOME=home and the venv first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_USAGE_STATS_ENABLED="0")
    return env


def wait_http(url, timeout_s, proc, log):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = "\n".join(Path(log).read_text(errors="replace").splitlines()[-15:])
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{tail}")
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the server is up
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not come up in {timeout_s} s")


@contextlib.contextmanager
def ray_head(home, temp_dir):
    """A real Ray head with the dashboard (Jobs API) on 127.0.0.1 and token auth on (a token in
    home/.ray/auth_token), yielded once its dashboard answers."""
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(secrets.token_hex(32))
    env = clean_env(home)
    dashboard, gcs = free_port(), free_port()
    ports = {"--port": gcs, "--dashboard-port": dashboard,
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
        wait_http(url, 90, proc, log.name)
        yield {"url": url, "env": env, "home": home, "gcs": f"127.0.0.1:{gcs}", "temp_dir": temp_dir}
    finally:
        stop_node(proc)  # SIGTERM (--block: ray start stops what it started), then its session
        log.close()


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("ray")) as started:
        yield started


def distmlp(head, *args, timeout=180, env=None, cwd=ROOT):
    return subprocess.run([str(BIN / "distmlp"), *args], env=env or head["env"], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_sweep_runs_on_the_cluster_through_submit(head):
    """submit --sweep: the search spaces are checked here and searched by `distmlp sweep` on the head."""
    r = distmlp(head, "submit", str(QUICKSTART), "-a", head["url"], "--sweep", "--samples", "2", "--wait", "--json",
                "--set", "optimizer.lr=loguniform(0.01, 0.5)", "--set", "run.steps=100", "--set", "run.eval_every=50",
                "--set", "cluster.workers=0", timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["status"] == "SUCCEEDED"
    logs = distmlp(head, "logs", out["job_id"], "-a", head["url"])
    summary = json.loads(logs.stdout.strip().splitlines()[-1])
    assert summary["sweep_dir"] == str(head["home"] / "distmlp-runs" / out["job_id"])
    assert summary["samples"] == 2 and len(summary["trials"]) == 2
    assert summary["spaces"] == {"optimizer.lr": "loguniform(0.01, 0.5)"}
    assert (head["home"] / "distmlp-runs" / out["job_id"] / "best.toml").is_file()


def test_a_sweep_with_a_bad_space_fails_before_any_network_call(tmp_path):
    r = subprocess.run([str(BIN / "distmlp"), "submit", str(QUICKSTART), "-a", "http://127.0.0.1:1", "--sweep",
                        "--set", "optimizer.lr=loguniform(0, 1)"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip() == ("error: --set 'optimizer.lr=loguniform(0, 1)': "
                                                      "loguniform needs 0 < low, got 0")


@pytest.mark.slow
def test_failing_job_is_failed_and_exits_nonzero(head):
    # a batch larger than the 8,000 training digits passes the job file check, fails on the cluster
    r = distmlp(head, "submit", str(QUICKSTART), "-a", head["url"], "--set", "optimizer.batch_size=9000",
                "--wait")
    assert r.returncode == 1
    assert r.stdout.strip().splitlines()[0].startswith("submitted distmlp-quickstart-")
    assert "larger than the 8000 training examples" in r.stdout
    assert r.stdout.strip().endswith("job failed")


@pytest.mark.slow
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


@pytest.mark.slow
def test_client_without_the_token_gets_one_line_help(head, tmp_path):
    r = distmlp(head, "jobs", "-a", head["url"], env=clean_env(tmp_path))  # a HOME without a token
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "requires a Ray auth token" in r.stderr and "~/.ray/auth_token" in r.stderr


@pytest.mark.slow
def test_token_from_env_var_works_and_a_wrong_one_is_rejected(head, tmp_path):
    token = (head["home"] / ".ray" / "auth_token").read_text()
    ok = distmlp(head, "jobs", "-a", head["url"], env={**clean_env(tmp_path), "RAY_AUTH_TOKEN": token})
    assert ok.returncode == 0, ok.stderr
    bad = distmlp(head, "jobs", "-a", head["url"], env={**clean_env(tmp_path), "RAY_AUTH_TOKEN": "0" * 64})
    assert bad.returncode == 2 and "rejected the Ray auth token" in bad.stderr


@pytest.mark.slow
def test_unknown_job_id_and_unreachable_address_are_one_line_errors(head):
    r = distmlp(head, "status", "no-such-job", "-a", head["url"])
    assert r.returncode == 2 and "no-such-job does not exist" in r.stderr and "Traceback" not in r.stderr
    r = distmlp(head, "jobs", "-a", f"127.0.0.1:{free_port()}")
    assert r.returncode == 2 and "cannot reach the Ray Jobs API" in r.stderr


def unpacked_working_dirs(head):
    """The working directories Ray unpacked for this head's jobs."""
    return {p for p in head["temp_dir"].glob("session_2*/runtime_resources/working_dir_files/*") if p.is_dir()}


def tree(root):
    """Relative paths below root, as upload_plan lists them (empty directories end with /)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        found += [(rel / name).as_posix() for name in filenames]
        if not dirnames and not filenames and dirpath != str(root):
            found.append(rel.as_posix() + "/")
    return sorted(found)


@pytest.mark.slow
def test_a_workdir_reaches_the_job_without_secrets_venvs_runs_or_outside_symlinks(head, tmp_path):
    root = hostile_tree(tmp_path)
    before = unpacked_working_dirs(head)
    r = distmlp(head, "submit", "job.toml", "--workdir", ".", "-a", head["url"], "--wait", "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "SUCCEEDED"
    assert f"({len(EXPECTED)} file(s)," in r.stderr
    new = unpacked_working_dirs(head) - before
    assert len(new) == 1, sorted(map(str, new))
    [job_dir] = new  # what the job saw as its working directory
    assert tree(job_dir) == EXPECTED
    assert (job_dir / "pkg" / "link_in").read_text() == "x = 1\n" and not (job_dir / "pkg" / "link_in").is_symlink()


@pytest.mark.slow
def test_submit_right_after_ray_start_waits_for_the_job_agent(tmp_path_factory):
    with ray_head(tmp_path_factory.mktemp("home"), tmp_path_factory.mktemp("ray")) as fresh:
        r = distmlp(fresh, "submit", str(QUICKSTART), "-a", fresh["url"], "--set", "run.steps=3", "--wait", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["status"] == "SUCCEEDED"
    assert r.stderr.count("waiting up to 60 s for the head's job agent") <= 1
    assert "No available agent" not in r.stderr


# ---- `distmlp train --address HOST:PORT` joins a `ray start --head` with token auth ----

@pytest.mark.slow
def test_train_joins_the_head_with_the_token_from_home(head, tmp_path):
    r = distmlp(head, "train", "--address", head["gcs"], "--steps", "3", "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 3 and summary["workers"] == 2


@pytest.mark.slow
def test_train_with_a_wrong_or_missing_token_says_so_in_one_line(head, tmp_path):
    wrong = distmlp(head, "train", "--address", head["gcs"], "--steps", "3", cwd=tmp_path,
                    env={**head["env"], "RAY_AUTH_TOKEN": "0" * 64})
    assert wrong.returncode == 2 and wrong.stderr.count("\n") == 1, wrong.stderr
    assert "rejected the Ray auth token" in wrong.stderr and "RAY_AUTH_TOKEN" in wrong.stderr
    missing = distmlp(head, "train", "--address", head["gcs"], "--steps", "3", cwd=tmp_path, env=clean_env(tmp_path))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr
    assert "requires a Ray auth token and none was found" in missing.stderr and "~/.ray/auth_token" in missing.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_more_workers_than_the_cluster_can_ever_hold_fail_at_once_in_one_line(head, tmp_path):
    """The head has 2 CPUs and no autoscaling config: 3 workers of 1 CPU can never be placed."""
    r = distmlp(head, "train", "--address", head["gcs"], "--workers", "3", "--steps", "3", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "cannot place 3 workers of 1 CPU each (SPREAD)" in r.stderr
    assert "1 node(s) have 2 CPU (2 in all), and no autoscaler can add nodes" in r.stderr


# ---- no cluster needed: parsing, safety checks ----

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


def test_rays_package_size_error_becomes_one_line():
    text = ("Request failed with status code 500: Traceback (most recent call last):\n  File \"x.py\", line 1\n"
            "ValueError: Package size (600.00MiB) exceeds the maximum size of 512.00MiB. To exclude large files, "
            "add them to '.gitignore' or '.rayignore' files.")
    message = str(jobs_api._explain(RuntimeError(text), "http://127.0.0.1:8265"))
    assert message.startswith("http://127.0.0.1:8265: Package size (600.00MiB) exceeds the maximum size of 512.00MiB")
    assert "\n" not in message and "Traceback" not in message and "--dry-run" in message
