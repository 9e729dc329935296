"""What `distmlp submit` uploads: never secrets, virtualenvs, run outputs, data or symlinks out of
the tree; `submit --dry-run` lists exactly what Ray's own packager zips (test_submit.py checks
what a job on a real head finds in its working directory)."""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from distmlp import jobs_api
from distmlp.cli import app

BIN = Path(sys.executable).parent

KEPT = {
    "job.toml": '[run]\nname = "tree"\nsteps = 3\n',
    "notes.md": "notes",
    "pkg/m.py": "x = 1\n",
    "sub/deep/keep.txt": "keep",
    "odd [1] name!.txt": "odd",
}
LEFT_OUT = {
    ".env": "SECRET=1",
    ".aws/credentials": "[default]\naws_secret_access_key = leaked",
    ".ray/auth_token": "f" * 64,
    ".git/HEAD": "ref: refs/heads/main",
    "sub/.hidden": "h",
    ".gitignore": "*.log\nbuild-*/\n",
    "debug.log": "ignored by .gitignore",
    "pkg/trace.log": "ignored by .gitignore at any depth",
    "build-1/out.bin": "ignored by .gitignore",
    ".venv/bin/python": "",
    "venv/lib/site.py": "",
    "myenv/pyvenv.cfg": "home = /usr/bin",  # a virtualenv under any name
    "myenv/lib/site.py": "",
    "runs/old/metrics.jsonl": "{}",
    "data/train.bin": "data",
    "pkg/__pycache__/m.cpython-311.pyc": "",
    "pkg/stale.pyc": "",
}
KEPT_LINKS = {"pkg/link_in": "m.py"}  # a file symlink inside the tree: uploaded as a copy
LEFT_OUT_LINKS = {  # name -> target; the outside targets are made by hostile_tree
    "link_out": "OUTSIDE/secret.txt",
    "dir_out": "OUTSIDE",
    "out [x]*": "OUTSIDE/secret.txt",  # a name with gitignore pattern characters
    "loop": ".",
    "pkg/up": "..",
    "dangling": "no-such-file",
    "sub/notes.txt": "../.env",  # inside the tree, but to a file that is left out itself
    "pkg/trace.txt": "trace.log",  # to a .gitignore'd file
}


def hostile_tree(tmp_path):
    """A working directory with everything LEFT_OUT next to everything KEPT; returns it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside secret")
    root = tmp_path / "work"
    for rel, text in {**KEPT, **LEFT_OUT}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / "empty").mkdir()
    for rel, target in {**KEPT_LINKS, **LEFT_OUT_LINKS}.items():
        os.symlink(target.replace("OUTSIDE", str(outside)), root / rel)
    return root


EXPECTED = sorted([*KEPT, *KEPT_LINKS, "empty/"])


def test_upload_plan_keeps_only_the_project_files(tmp_path):
    root = hostile_tree(tmp_path)
    excludes, files = jobs_api.upload_plan(root)
    assert list(files) == EXPECTED


def test_rays_own_zip_with_those_excludes_holds_exactly_the_listed_files(tmp_path):
    """The Jobs client zips with create_package(dir, excludes=Ray's defaults + ours): do the same."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package
    root = hostile_tree(tmp_path)
    excludes, files = jobs_api.upload_plan(root)
    zip_path = tmp_path / "pkg.zip"
    create_package(str(root), zip_path, include_gitignore=True,
                   excludes=ray_constants.get_runtime_env_default_excludes() + list(excludes))
    with zipfile.ZipFile(zip_path) as zf:
        names = sorted(zf.namelist())
        assert names == list(files)
        assert zf.read("pkg/link_in") == b"x = 1\n"
        blob = b"".join(zf.read(n) for n in names if not n.endswith("/"))
    assert b"leaked" not in blob and b"outside secret" not in blob and b"f" * 64 not in blob


def test_prepare_without_a_workdir_uploads_the_job_file_alone(tmp_path):
    root = hostile_tree(tmp_path)
    with jobs_api.prepare(root / "job.toml", ["run.seed=3"]) as upload:
        assert sorted(os.listdir(upload.working_dir)) == ["job.toml"]
        assert upload.files == ("job.toml",) and upload.excludes == ()
        assert upload.entrypoint == "distmlp train job.toml --address auto --json --set run.seed=3"
        assert upload.runtime_env() == {"working_dir": upload.working_dir, "excludes": []}
        staged = upload.working_dir
    assert not os.path.exists(staged)  # the staging directory goes with the block


def test_prepare_with_a_workdir_runs_the_job_by_its_relative_path(tmp_path):
    root = hostile_tree(tmp_path)
    (root / "jobs").mkdir()
    (root / "jobs" / "a b.toml").write_text("")
    with jobs_api.prepare(root / "jobs" / "a b.toml", workdir=root, home_run_dir="distmlp-runs/x") as upload:
        assert upload.working_dir == str(root.resolve())
        assert "jobs/a b.toml" in upload.files
        assert upload.entrypoint == ("distmlp train 'jobs/a b.toml' --address auto --json "
                                     '--run-dir "$HOME"/distmlp-runs/x')
        assert upload.size == sum(len(t) for t in KEPT.values()) + len("x = 1\n")


@pytest.mark.parametrize("job", ["../elsewhere.toml", "runs/old/job.toml", ".hidden.toml", "debug-job.log"])
def test_a_job_file_outside_the_workdir_or_left_out_of_it_is_refused_in_one_line(tmp_path, job):
    root = hostile_tree(tmp_path)
    (root / job).write_text("")
    with pytest.raises(jobs_api.JobsError) as e:
        with jobs_api.prepare(root / job, workdir=root):
            pass
    assert "must be inside --workdir" in str(e.value) and "\n" not in str(e.value)


def test_the_job_agent_retry_gives_up_after_its_bound(capsys):
    calls, sleeps = [], []

    def fails_three_times():
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError("Request failed with status code 500: No available agent to submit job, "
                               "please try again later..")
        return "job-1"
    assert jobs_api.until_agent_ready(fails_three_times, wait_s=60, sleep=sleeps.append) == "job-1"
    assert len(calls) == 4 and sleeps == [0.5, 1.0, 2.0]
    assert capsys.readouterr().err == "waiting up to 60 s for the head's job agent to start\n"

    def never_ready():
        raise RuntimeError("Request failed with status code 500: No available agent to submit job")
    with pytest.raises(jobs_api.JobsError, match="did not come up within 0 s") as e:
        jobs_api.until_agent_ready(never_ready, wait_s=0.2, sleep=lambda s: None)
    assert "\n" not in str(e.value)

    answers = [RuntimeError("500: No available agent to submit job"), ConnectionError("Connection aborted.")]

    def drops_the_connection_while_starting():
        if answers:
            raise answers.pop(0)
        return "job-2"
    assert jobs_api.until_agent_ready(drops_the_connection_while_starting, wait_s=60, sleep=lambda s: None) == "job-2"

    for error in (RuntimeError("Request failed with status code 400: bad runtime_env"),
                  ConnectionError("Connection refused")):  # not after a "no agent yet" answer
        def other_error():
            calls.append(1)
            raise error
        calls.clear()
        with pytest.raises(type(error)):
            jobs_api.until_agent_ready(other_error, wait_s=60, sleep=sleeps.append)
        assert len(calls) == 1  # only a starting head's answers are retried


def dry_run(*args, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run([str(BIN / "distmlp"), "submit", *args, "--dry-run"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_dry_run_lists_the_upload_and_the_command_without_a_cluster(tmp_path):
    """In a subprocess (a hostile tree must not take pytest down), with no address anywhere."""
    root = hostile_tree(tmp_path)
    r = dry_run("job.toml", "--workdir", ".", "--json", cwd=root)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert shown["files"] == EXPECTED and shown["workdir"] == str(root.resolve())
    assert shown["entrypoint"].startswith("distmlp train job.toml --address auto --json --run-dir ")
    assert "/link_out" in shown["excludes"] and "/out\\ \\[x\\]\\*" in shown["excludes"]

    text = dry_run("job.toml", "--workdir", ".", "--set", "run.seed=2", cwd=root)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"would upload {len(EXPECTED)} file(s)")
    assert [line.strip() for line in lines[1:-1]] == EXPECTED
    assert lines[-1].startswith("and run: distmlp train job.toml --address auto --json --set run.seed=2")

    alone = dry_run(str(root / "job.toml"), "--json", cwd=tmp_path)
    assert alone.returncode == 0, alone.stderr
    assert json.loads(alone.stdout)["files"] == ["job.toml"] and json.loads(alone.stdout)["workdir"] is None


def test_dry_run_of_a_missing_workdir_is_one_line(tmp_path, monkeypatch):
    root = hostile_tree(tmp_path)
    monkeypatch.chdir(root)
    r = CliRunner().invoke(app, ["submit", "job.toml", "--workdir", "nowhere", "--dry-run"])
    assert r.exit_code == 2 and r.stderr == "error: nowhere: no such working directory\n"
