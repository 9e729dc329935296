"""Submit `distmlp train` to a Ray cluster over the Ray Jobs API, and follow, stop, list jobs.

The package sent with a job is a zip made here: the job file at its root, plus the working
directory (minus data, runs, caches, .git, virtualenvs) only when asked for. Ray imports stay
inside functions so `import distmlp.jobs_api` is cheap for the CLI's --help.
"""

import asyncio
import ipaddress
import logging
import os
import shlex
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from distmlp import config
from distmlp.errors import UserError

DEFAULT_PORT = 8265  # the dashboard port, which serves the Jobs API
# Never uploaded with a working directory (names matched at any depth).
EXCLUDED_DIRS = {".git", ".venv", "venv", "env", "runs", "data", "__pycache__", ".pytest_cache",
                 ".hypothesis", ".mypy_cache", ".ruff_cache", ".ipynb_checkpoints", "node_modules"}
EXCLUDED_SUFFIXES = (".pyc", ".egg-info")
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NO_TOKEN_HELP = ("copy the cluster's token (`ray get-auth-token` on the head) to ~/.ray/auth_token, "
                 "or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")


class JobsError(UserError):
    """A bad address, a missing token, an unreachable cluster or an unknown job id."""


@dataclass(frozen=True)
class Package:
    zip_path: str  # the working_dir zip sent to the cluster
    entrypoint: str  # the shell command the job runs
    size: int  # bytes of the zip
    files: int


def resolve_address(address=None, environ=os.environ):
    """The Jobs API URL from --address, else RAY_ADDRESS; host:port gets http://."""
    address = address or environ.get("RAY_ADDRESS")
    if not address:
        raise JobsError(f"no cluster address: pass --address http://HOST:{DEFAULT_PORT} or set RAY_ADDRESS")
    if address == "auto" or address.startswith("ray://"):
        raise JobsError(f"address {address!r}: the Jobs API needs the dashboard's http://HOST:{DEFAULT_PORT}")
    if "://" not in address:
        address = f"http://{address}"
    parts = urlsplit(address)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JobsError(f"address {address!r}: expected http://HOST:PORT or https://HOST:PORT")
    try:
        parts.port
    except ValueError:
        raise JobsError(f"address {address!r}: the port is not a number") from None
    return address.rstrip("/")


def is_loopback(url):
    """True when url's host is this machine (localhost, 127.0.0.0/8, ::1)."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_headers(environ=os.environ):
    """{"authorization": "Bearer ..."} from Ray's own token sources, or {} when there is none.

    Ray's client only sends a token when RAY_AUTH_MODE=token; heads started by `ray start`
    or ray.init() enable token auth on their own, so distmlp looks the token up whatever the
    mode (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token), except with
    RAY_AUTH_MODE=disabled.
    """
    mode = environ.get("RAY_AUTH_MODE", "").lower()
    if mode == "disabled":
        return {}
    from ray._raylet import AuthenticationTokenLoader
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()
    try:
        headers = loader.get_token_for_http_header(ignore_auth_mode=True)
    except Exception as e:  # a token path that cannot be read
        raise JobsError(f"cannot read the Ray auth token: {e}") from None
    if not headers and mode == "token":
        raise JobsError(f"RAY_AUTH_MODE=token but no Ray auth token was found: {NO_TOKEN_HELP}")
    return headers


def check_safe(url, insecure=False):
    """Refuse plain http to another machine unless insecure: without a token anyone who reaches the
    Jobs API runs code (CVE-2023-48022), with one the token crosses the network in clear text."""
    if urlsplit(url).scheme == "http" and not is_loopback(url) and not insecure:
        raise JobsError(f"{url}: refusing plain http to a non-loopback Jobs API (the Ray auth token, "
                        "or the lack of one, would be exposed on the network); tunnel with "
                        "`ray dashboard cluster.yaml` and use http://127.0.0.1:8265, use https://, "
                        "or pass --insecure")


def connect(address=None, insecure=False):
    """A JobSubmissionClient for address (or RAY_ADDRESS), with the Ray auth token when found."""
    url = resolve_address(address)
    check_safe(url, insecure)
    headers = auth_headers()
    from ray.job_submission import JobSubmissionClient
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "Uploading package" chatter
    try:
        return JobSubmissionClient(url, headers=headers)
    except Exception as e:
        raise _explain(e, url) from None


def _explain(e, url):
    """A one-line JobsError for what the Jobs API client raised."""
    text = " ".join(str(e).split())
    if "Authentication required" in text or "Missing authentication token" in text:
        return JobsError(f"{url}: the cluster requires a Ray auth token and none was found: {NO_TOKEN_HELP}")
    if "Authentication failed" in text or "Invalid authentication token" in text:
        return JobsError(f"{url}: the cluster rejected the Ray auth token: {NO_TOKEN_HELP}")
    if isinstance(e, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return JobsError(f"{url}: cannot reach the Ray Jobs API (is the head running and the port "
                         "its dashboard port?)")
    if "does not exist" in text or "not found" in text.lower():
        return JobsError(f"{url}: {text}")
    return JobsError(f"{url}: {text[:300]}")


def upload_limit():
    """Ray's maximum package size for a working_dir upload, in bytes."""
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE
    return GCS_STORAGE_MAX_SIZE


def is_excluded(rel_path):
    """True for paths under an excluded directory or with an excluded suffix."""
    parts = Path(rel_path).parts
    return any(p in EXCLUDED_DIRS or p.endswith(EXCLUDED_SUFFIXES) for p in parts)


def workdir_files(root):
    """Relative paths of the files in root that a job upload includes, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        dirnames[:] = sorted(d for d in dirnames if not is_excluded(os.path.join(rel_dir, d)))
        for name in filenames:
            rel = os.path.normpath(os.path.join(rel_dir, name))
            if not is_excluded(rel) and os.path.isfile(os.path.join(root, rel)):
                found.append(rel)
    return sorted(found)


def entrypoint(job_name, overrides=(), home_run_dir=None):
    """`distmlp train JOB --address auto --json [--set k=v ...] [--run-dir "$HOME"/DIR]`.

    home_run_dir is relative to $HOME on the cluster's driver node, so the run outlives the
    job's temporary working directory.
    """
    args = ["distmlp", "train", job_name, "--address", "auto", "--json"]
    for o in overrides:
        args += ["--set", o]
    command = shlex.join(args)
    if home_run_dir is not None:
        command += ' --run-dir "$HOME"/' + shlex.quote(home_run_dir)
    return command


def package(job_path, overrides=(), workdir=None, out_dir=None, limit=None, home_run_dir=None):
    """Zip the job file (and workdir, when given) for upload; returns a Package.

    The job file goes to the zip's root unless it lies inside workdir, where it keeps its
    relative path. Raises JobsError when the zip exceeds Ray's upload limit.
    """
    job_path = Path(job_path).resolve()
    if not job_path.is_file():
        raise JobsError(f"{job_path}: no such job file")
    files = []  # (source path, name in the zip)
    job_name = None
    if workdir is not None:
        root = Path(workdir).resolve()
        if not root.is_dir():
            raise JobsError(f"{workdir}: no such working directory")
        files = [(root / rel, rel) for rel in workdir_files(root)]
        if job_path.is_relative_to(root) and not is_excluded(job_path.relative_to(root)):
            job_name = str(job_path.relative_to(root))
    if job_name is None:
        job_name = job_path.name
        if job_name in {name for _, name in files}:
            raise JobsError(f"{job_path}: the working directory already has a different {job_name}")
        files.append((job_path, job_name))
    out_dir = out_dir or tempfile.mkdtemp(prefix="distmlp-submit-")
    zip_path = os.path.join(out_dir, "distmlp-job.zip")
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as zf:
        for src, name in files:
            zf.write(src, name)
    size = os.path.getsize(zip_path)
    limit = upload_limit() if limit is None else limit
    if size >= limit:
        where = f"working directory {workdir}" if workdir is not None else f"job file {job_path}"
        raise JobsError(f"the upload of {where} is {size / 2**20:.1f} MiB, over Ray's limit of "
                        f"{limit / 2**20:.0f} MiB: move large files out of it or into an excluded "
                        f"directory ({', '.join(sorted(EXCLUDED_DIRS))})")
    return Package(zip_path, entrypoint(job_name, overrides, home_run_dir), size, len(files))


def submission_id(job, now=None):
    """A readable, unique job id: distmlp-<run name>-<UTC time>."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in job.run.name)
    return f"distmlp-{name}-{stamp}-{os.urandom(2).hex()}"


RUNS_HOME = "distmlp-runs"  # under $HOME on the driver node, when the job sets no run.run_dir


def submit(client, job_path, overrides=(), workdir=None):
    """Validate the job locally, upload it and start it; returns (job id, Package).

    Unless the job sets run.run_dir, the run goes to ~/distmlp-runs/<job id> on the node
    that runs the driver (the head, for jobs submitted to it).
    """
    job = config.load_job(job_path, overrides)
    sid = submission_id(job)
    home_run_dir = None if job.run.run_dir else f"{RUNS_HOME}/{sid}"
    with tempfile.TemporaryDirectory(prefix="distmlp-submit-") as tmp:
        pkg = package(job_path, overrides, workdir, out_dir=tmp, home_run_dir=home_run_dir)
        try:
            job_id = client.submit_job(
                entrypoint=pkg.entrypoint,
                submission_id=sid,
                runtime_env={"working_dir": pkg.zip_path},
                metadata={"distmlp_job": os.path.basename(job_path), "run_name": job.run.name},
            )
        except Exception as e:
            raise _explain(e, client.get_address()) from None
    return job_id, pkg


def call(client, method, *args):
    """client.method(*args) with errors turned into one-line JobsErrors."""
    try:
        return getattr(client, method)(*args)
    except Exception as e:
        raise _explain(e, client.get_address()) from None


def status(client, job_id):
    """The job's status name (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED)."""
    return str(call(client, "get_job_status", job_id).value)


def info(client, job_id):
    """A flat dict describing one job."""
    return describe(call(client, "get_job_info", job_id))


def describe(details):
    """JobDetails -> a flat, JSON-ready dict."""
    return {"job_id": details.submission_id or details.job_id, "status": str(details.status.value),
            "entrypoint": details.entrypoint, "message": details.message,
            "start_time": details.start_time, "end_time": details.end_time,
            "metadata": details.metadata or {}}


def list_jobs(client):
    """All jobs the cluster knows, oldest first, as flat dicts."""
    jobs = [describe(d) for d in call(client, "list_jobs")]
    return sorted(jobs, key=lambda j: j["start_time"] or 0)


def logs(client, job_id):
    """The job's logs so far, as one string."""
    return call(client, "get_job_logs", job_id)


def follow(client, job_id, write):
    """Stream the job's logs to write(chunk) until it ends; returns its final status."""
    async def tail():
        async for chunk in client.tail_job_logs(job_id):
            write(chunk)
    status(client, job_id)  # an unknown id fails here, with a clear message
    try:
        asyncio.run(tail())
    except Exception as e:
        raise _explain(e, client.get_address()) from None
    return wait(client, job_id, timeout_s=30)


def wait(client, job_id, timeout_s=None, poll_s=0.5):
    """Poll until the job reaches a terminal status (or timeout_s passes); returns the status."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        state = status(client, job_id)
        if state in TERMINAL or (deadline is not None and time.monotonic() > deadline):
            return state
        time.sleep(poll_s)


def stop(client, job_id):
    """Ask the cluster to stop the job; False when it had already ended."""
    return bool(call(client, "stop_job", job_id))
