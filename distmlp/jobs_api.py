"""Submit `distmlp train` to a Ray cluster over the Ray Jobs API, and follow, stop, list jobs.

A job's files go to the cluster as Ray's runtime_env working_dir, which Ray zips and uploads:
a directory holding only the job file, or the user's --workdir minus what EXCLUDES, its
.gitignore / .rayignore and upload_plan leave out. Ray imports stay inside functions so
`import distmlp.jobs_api` is cheap for the CLI's --help.
"""

import asyncio
import contextlib
import ipaddress
import logging
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from distmlp import config
from distmlp.errors import UserError

DEFAULT_PORT = 8265  # the dashboard port, which serves the Jobs API
# Never uploaded with a --workdir (gitignore-style patterns, on top of Ray's own .git, .venv,
# venv, __pycache__): dotfiles and dot-directories at any depth, e.g. .env, .aws/credentials,
# .ray/auth_token, .git, caches (".?*", since ".*" would also match the root, "."), virtualenvs,
# run outputs, data sets, build leftovers.
EXCLUDES = (".?*", "venv/", "env/", "runs/", "data/", "__pycache__/", "*.pyc", "*.egg-info/",
            "node_modules/")
AGENT_WAIT_S = 60.0  # how long submit retries while a just-started head has no job agent yet
NO_AGENT = "No available agent to submit job"  # the head's answer until its job agent is up
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
NO_TOKEN_HELP = ("copy the cluster's token (`ray get-auth-token` on the head) to ~/.ray/auth_token, "
                 "or set RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH")


class JobsError(UserError):
    """A bad address, a missing token, an unreachable cluster or an unknown job id."""


@dataclass(frozen=True)
class Upload:
    working_dir: str  # the directory Ray zips and uploads: the job's working directory there
    excludes: tuple[str, ...]  # gitignore-style patterns (from working_dir) Ray leaves out of it
    files: tuple[str, ...]  # what Ray uploads, relative to working_dir ("dir/" for an empty one)
    size: int  # bytes of those files before compression
    entrypoint: str  # the shell command the job runs there

    def runtime_env(self):
        return {"working_dir": self.working_dir, "excludes": list(self.excludes)}


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


def token_help(environ=os.environ):
    """Where the token was taken from, and where one is looked for, as one clause."""
    if environ.get("RAY_AUTH_TOKEN"):
        used = "the token came from RAY_AUTH_TOKEN"
    elif environ.get("RAY_AUTH_TOKEN_PATH"):
        used = f"the token came from RAY_AUTH_TOKEN_PATH={environ['RAY_AUTH_TOKEN_PATH']}"
    else:
        used = "the token is looked for in RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, then ~/.ray/auth_token"
    return f"{used}: {NO_TOKEN_HELP}"


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
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "Uploading / Creating package" chatter
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
    too_big = re.search(r"Package size \(.*?\) exceeds the maximum size of [\d.]+ ?MiB", text)
    if too_big:
        return JobsError(f"{url}: {too_big.group(0)}: move large files into data/ or runs/, or list them in "
                         "the directory's .gitignore or .rayignore (`distmlp submit --dry-run` lists the upload)")
    if isinstance(e, ConnectionError) or "Failed to connect" in text or "Connection refused" in text:
        return JobsError(f"{url}: cannot reach the Ray Jobs API (is the head running and the port "
                         "its dashboard port?)")
    if "does not exist" in text or "not found" in text.lower():
        return JobsError(f"{url}: {text}")
    return JobsError(f"{url}: {text[:300]}")


def upload_plan(root):
    """(excludes, files): how Ray's working_dir upload of directory root is told what to leave out,
    and the files it then uploads.

    Ray's packager follows symlinks, so besides EXCLUDES the excludes name each symlink that
    points out of root, nowhere, to a directory (which could also loop) or to a file left out
    itself, and each virtualenv (a directory with pyvenv.cfg), found by Ray's own walk; files
    come from a last walk with only those patterns, the way the Jobs client zips, and must not
    contain anything left out for what it is.
    """
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    root = Path(root).resolve()
    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    ray_defaults = ray_constants.get_runtime_env_default_excludes()  # the Jobs client adds these
    quiet = logging.getLogger(__name__)
    by_kind = []  # paths (relative to root) left out for what they are, not for their name

    def leaves_the_tree(path):
        if path.is_symlink():
            target = path.resolve()
            unsafe = not target.exists() or target.is_dir() or not target.is_relative_to(root)
        else:
            unsafe = path.is_dir() and (path / "pyvenv.cfg").is_file()
        if unsafe:
            by_kind.append(path.relative_to(root).as_posix())
        return unsafe

    def uploaded():  # what Ray's zip handler packs: files and empty directories
        excludes = tuple(EXCLUDES) + tuple("/" + _escape(rel) for rel in by_kind)
        files = []

        def collect(path):
            if path.is_file():
                files.append(path.relative_to(root).as_posix())
            elif path != root and path.is_dir() and next(path.iterdir(), None) is None:
                files.append(path.relative_to(root).as_posix() + "/")
        _dir_travel(root, [_get_excludes(root, ray_defaults + list(excludes))], collect,
                    include_gitignore=include_gitignore, logger=quiet)
        return excludes, files

    _dir_travel(root, [_get_excludes(root, ray_defaults + list(EXCLUDES)), leaves_the_tree],
                lambda path: None, include_gitignore=include_gitignore, logger=quiet)
    excludes, files = uploaded()
    kept = set(files)
    to_hidden = [f for f in files if (root / f).is_symlink()
                 and (root / f).resolve().relative_to(root).as_posix() not in kept]
    if to_hidden:  # e.g. notes.txt -> .env
        by_kind += to_hidden
        excludes, files = uploaded()
    leaked = [f for f in files if any(f == rel or f.startswith(rel + "/") for rel in by_kind)]
    if leaked:
        raise JobsError(f"{root}: cannot keep {leaked[0]!r} out of the upload (rename it, or list it "
                        "in the directory's .rayignore)")
    return excludes, tuple(sorted(files))


def _escape(rel):
    """rel as a gitignore pattern that matches exactly that path."""
    return re.sub(r"([\\\[\]*?!# ])", r"\\\1", rel)


def entrypoint(job_name, overrides=(), home_run_dir=None, sweep_args=None):
    """`distmlp train JOB --address auto --json [--set k=v ...] [--run-dir "$HOME"/DIR]`, or
    `distmlp sweep ... SWEEP_ARGS [--sweep-dir "$HOME"/DIR]` when sweep_args is a list.

    home_run_dir is relative to $HOME on the cluster's driver node, so the run outlives the
    job's temporary working directory.
    """
    command = "train" if sweep_args is None else "sweep"
    args = ["distmlp", command, job_name, "--address", "auto", "--json", *(sweep_args or ())]
    for o in overrides:
        args += ["--set", o]
    line = shlex.join(args)
    if home_run_dir is not None:
        line += f' --{"run" if sweep_args is None else "sweep"}-dir "$HOME"/' + shlex.quote(home_run_dir)
    return line


@contextlib.contextmanager
def prepare(job_path, overrides=(), workdir=None, home_run_dir=None, sweep_args=None):
    """The Upload for a job file (and workdir, when given), valid inside the with block.

    Without workdir the upload is a temporary directory holding a copy of the job file; with
    it, the job file must be one of the files upload_plan keeps.
    """
    job_path = Path(job_path).resolve()
    if not job_path.is_file():
        raise JobsError(f"{job_path}: no such job file")
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="distmlp-submit-") as tmp:
            shutil.copyfile(job_path, os.path.join(tmp, job_path.name))
            yield Upload(tmp, (), (job_path.name,), job_path.stat().st_size,
                         entrypoint(job_path.name, overrides, home_run_dir, sweep_args))
        return
    root = Path(workdir).resolve()
    if not root.is_dir():
        raise JobsError(f"{workdir}: no such working directory")
    excludes, files = upload_plan(root)
    job_name = job_path.relative_to(root).as_posix() if job_path.is_relative_to(root) else None
    if job_name not in files:
        raise JobsError(f"{job_path}: the job file must be inside --workdir {root} and not left out of "
                        "its upload (dotfiles, .gitignore, .rayignore, runs/, data/); "
                        "`distmlp submit JOB --workdir DIR --dry-run` lists what is uploaded")
    size = sum((root / f).stat().st_size for f in files if not f.endswith("/"))
    yield Upload(str(root), excludes, files, size, entrypoint(job_name, overrides, home_run_dir, sweep_args))


def submission_id(job, now=None):
    """A readable, unique job id: distmlp-<run name>-<UTC time>."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in job.run.name)
    return f"distmlp-{name}-{stamp}-{os.urandom(2).hex()}"


RUNS_HOME = "distmlp-runs"  # under $HOME on the driver node, when the job sets no run.run_dir


def plan(job_path, overrides=()):
    """(job config, submission id, run directory under $HOME or None) for a job about to go
    (overrides: the fixed ones; a sweep's search spaces are checked by distmlp.sweep)."""
    job = config.load_job(job_path, overrides)
    sid = submission_id(job)
    return job, sid, None if job.run.run_dir else f"{RUNS_HOME}/{sid}"


def submit(client, job_path, overrides=(), workdir=None, sweep_args=None, fixed=None):
    """Validate the job locally, upload it and start it; returns (job id, Upload).

    Unless the job sets run.run_dir, the run goes to ~/distmlp-runs/<job id> on the node
    that runs the driver (the head, for jobs submitted to it). With sweep_args (a list) the job
    runs `distmlp sweep` instead, its directory there; fixed: the overrides that are not
    search spaces.
    """
    job, sid, home_run_dir = plan(job_path, overrides if fixed is None else fixed)
    if sweep_args is not None and job.run.run_dir:
        home_run_dir = None
    with prepare(job_path, overrides, workdir, home_run_dir, sweep_args) as upload:
        def send():
            return client.submit_job(
                entrypoint=upload.entrypoint,
                submission_id=sid,
                runtime_env=upload.runtime_env(),
                metadata={"distmlp_job": os.path.basename(job_path), "run_name": job.run.name},
            )
        try:
            job_id = until_agent_ready(send)
        except Exception as e:
            raise _explain(e, client.get_address()) from None
    return job_id, upload


def until_agent_ready(send, wait_s=AGENT_WAIT_S, sleep=time.sleep):
    """send(), again with backoff while the head answers that it has no job agent yet (just after
    `ray start --head`), for up to wait_s seconds; says once on stderr that it waits. Once it has
    answered so, a dropped connection counts as the head still starting too."""
    deadline = time.monotonic() + wait_s
    delay = 0.5
    while True:
        try:
            return send()
        except Exception as e:
            starting = NO_AGENT in str(e) or (delay > 0.5 and isinstance(e, OSError))
            if not starting:
                raise
            if time.monotonic() + delay > deadline:
                raise JobsError(f"the head's job agent did not come up within {wait_s:.0f} s (it answers "
                                f"{NO_AGENT!r}): check the head's dashboard_agent.log") from None
        if delay == 0.5:
            print(f"waiting up to {wait_s:.0f} s for the head's job agent to start", file=sys.stderr)
        sleep(delay)
        delay = min(2 * delay, 5.0)


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
