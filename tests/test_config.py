"""Job configuration: every bad key or value is one ConfigError line naming it; TOML round trips."""

import dataclasses
import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distmlp import config
from distmlp.config import ConfigError

# (--set override, what the one-line message must contain: the key and what is allowed)
BAD_OVERRIDES = [
    ("model.sizes=abc", ["model.sizes", "list of integers"]),
    ("model.sizes=[784]", ["model.sizes", "at least two positive widths"]),
    ("model.sizes=[784, 0, 10]", ["model.sizes", "at least two positive widths"]),
    ("model.sizes=[784, 16.5, 10]", ["model.sizes", "list of integers"]),
    ("model.sizes=[784, true, 10]", ["model.sizes", "list of integers"]),
    ("model.dtype=float16", ["model.dtype", "float32, float64"]),
    ("model.dtype=32", ["model.dtype", "expected str"]),
    ("model.kernel=cuda", ["model.kernel", "allowed: numpy, numba", "cuda"]),
    ("optimizer.name=adam", ["optimizer.name", "sgd, minibatch, gd"]),
    ("optimizer.name=[1]", ["optimizer.name", "expected str"]),
    ("optimizer.lr=-0.1", ["optimizer.lr", "> 0"]),
    ("optimizer.lr=0", ["optimizer.lr", "> 0"]),
    ("optimizer.lr=nan", ["optimizer.lr", "> 0"]),
    ("optimizer.lr=inf", ["optimizer.lr", "finite"]),
    ("optimizer.lr=fast", ["optimizer.lr", "expected float"]),
    ("optimizer.lr=true", ["optimizer.lr", "expected float"]),
    ("optimizer.batch_size=0", ["optimizer.batch_size", ">= 1"]),
    ("optimizer.batch_size=1.5", ["optimizer.batch_size", "expected int"]),
    ("optimizer.batch_size=big", ["optimizer.batch_size", "expected int"]),
    ("optimizer.sampling=random", ["optimizer.sampling", "shuffle, sample, sequential"]),
    ("optimizer.momentum=1.0", ["optimizer.momentum", "[0, 1)"]),
    ("optimizer.momentum=-0.1", ["optimizer.momentum", "[0, 1)"]),
    ("data.dataset=5", ["data.dataset", "expected str"]),
    ("data.path=5", ["data.path", "expected str"]),
    ("run.name=5", ["run.name", "expected str"]),
    ("run.name=../../x", ["run.name", "'../../x'", "letters, digits, _ . - and no '..'"]),
    ("run.name=..", ["run.name", "no '..'"]),
    ("run.name=a..b", ["run.name", "no '..'"]),
    ("run.name=a/b", ["run.name", "'a/b'"]),
    ("run.name=/etc", ["run.name", "'/etc'"]),
    ('run.name=""', ["run.name", "''"]),
    ("run.name=a b", ["run.name", "'a b'"]),
    ('run.name="a\\nb"', ["run.name", "'a\\nb'"]),
    ("run.name=café", ["run.name", "'café'"]),
    ("run.seed=-1", ["run.seed", ">= 0"]),
    ("run.seed=true", ["run.seed", "expected int"]),
    ("run.seed=1.0", ["run.seed", "expected int"]),
    ("run.epochs=0", ["run.epochs", ">= 1"]),
    ("run.steps=0", ["run.steps", ">= 1"]),
    ("run.steps=ten", ["run.steps", "expected int"]),
    ("run.eval_every=-1", ["run.eval_every", ">= 0"]),
    ("run.log_every=-1", ["run.log_every", ">= 0"]),
    ("run.checkpoint_every=-1", ["run.checkpoint_every", ">= 0"]),
    ("run.keep_last=0", ["run.keep_last", ">= 1"]),
    ("run.on_nonfinite=ignore", ["run.on_nonfinite", "stop, skip"]),
    ("run.run_dir=3", ["run.run_dir", "expected str"]),
    ("run.mlflow_uri=3", ["run.mlflow_uri", "expected str"]),
    ("cluster.workers=-1", ["cluster.workers", ">= 0"]),
    ("cluster.workers=1.5", ["cluster.workers", "expected int"]),
    ("cluster.address=5", ["cluster.address", "expected str"]),
    ("cluster.placement=RANDOM", ["cluster.placement", "SPREAD, PACK, STRICT_SPREAD, STRICT_PACK"]),
    ("cluster.cpus_per_worker=0", ["cluster.cpus_per_worker", "> 0"]),
    ("cluster.max_failures=-2", ["cluster.max_failures", ">= -1"]),
    ("cluster.step_timeout_s=0", ["cluster.step_timeout_s", "> 0"]),
    ("cluster.replace_timeout_s=0", ["cluster.replace_timeout_s", "> 0"]),
    ("cluster.min_workers=5", ["cluster.min_workers: 5", "between 1 and cluster.workers (2)"]),
    ("cluster.transport=fast", ["cluster.transport", "auto, actors, mesh"]),
    ("cluster.transport=compiled", ["cluster.transport: 'compiled' is not allowed; allowed: auto, actors, mesh"]),
    ("optimizer.foo=1", ["optimizer.foo", "unknown key", "name, lr, batch_size, sampling, momentum"]),
    ("run.seeds=1", ["run.seeds", "unknown key", "seed"]),
    ("foo.bar=1", ["[foo]", "unknown table", "model, optimizer, data, run, cluster"]),
    # --set syntax
    ("optimizer.lr", ["'optimizer.lr'", "section.key=value"]),
    ("lr=0.1", ["'lr=0.1'", "section.key=value"]),
    ("a.b.c=1", ["'a.b.c=1'", "section.key=value"]),
    ("=1", ["'=1'", "section.key=value"]),
    (".lr=1", ["'.lr=1'", "section.key=value"]),
    ("optimizer.=1", ["'optimizer.=1'", "section.key=value"]),
]


def one_line_error(fn, *args):
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message and message
    return message


@pytest.mark.parametrize("override, expected", BAD_OVERRIDES, ids=[o for o, _ in BAD_OVERRIDES])
def test_bad_override_is_one_line_naming_key_and_allowed_values(override, expected):
    message = one_line_error(config.load_job, None, [override])
    for part in expected:
        assert part in message, message


def test_run_names_that_stay_inside_the_runs_directory_are_accepted():
    for name in ("quickstart", "mnist-sgd_2", "v1.2", ".hidden", "a.b-c_d", "-", "x" * 200):
        assert config.load_job(None, [f"run.name={name}"]).run.name == name


def test_the_table_covers_every_config_key():
    covered = {o.partition("=")[0] for o, _ in BAD_OVERRIDES}
    every = {f"{section}.{f.name}" for section, cls in config.SECTIONS.items() for f in dataclasses.fields(cls)}
    assert every <= covered, sorted(every - covered)


# (job file text, expected message parts)
BAD_FILES = [
    ("[model]\nsizes = [784, 10]\n[optimiser]\nlr = 0.1\n", ["unknown table [optimiser]", "optimizer"]),
    ("optimizer = 3\n", ["optimizer must be a table"]),
    ("[optimizer]\nlr = \n", ["not valid TOML"]),
    ("[run]\nsteps = 10\nsteps = 20\n", ["not valid TOML"]),
    ("[cluster]\nworkers = -2\n", ["cluster.workers", ">= 0"]),
    ("[optimizer]\nname = \"adagrad\"\n", ["optimizer.name", "sgd, minibatch, gd"]),
]


@pytest.mark.parametrize("text, expected", BAD_FILES)
def test_bad_job_file_is_one_line_naming_file_and_key(tmp_path, text, expected):
    path = tmp_path / "job.toml"
    path.write_text(text)
    message = one_line_error(config.load_job, str(path))
    for part in expected:
        assert part in message, message


def test_missing_job_file_names_it(tmp_path):
    message = one_line_error(config.load_job, str(tmp_path / "nope.toml"))
    assert "nope.toml" in message and "no such job file" in message


def test_override_into_a_non_table_is_refused(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("run = 1\n")
    assert "run" in one_line_error(config.load_job, str(path), ["run.steps=3"])


def test_no_data_source_is_refused():
    message = one_line_error(config.job_from_dict, {"data": {"dataset": None}})
    assert "data.dataset" in message and "data.path" in message


def test_config_error_is_a_user_error():
    from distmlp.errors import UserError
    assert issubclass(ConfigError, UserError) and issubclass(ConfigError, ValueError)


# ------------------------------------------------------------------ good input


def test_defaults_are_the_seed_setup():
    job = config.load_job()
    assert job.model.sizes == (784, 16, 16, 10) and job.model.dtype == "float32"
    assert (job.optimizer.name, job.optimizer.batch_size, job.optimizer.momentum) == ("minibatch", 32, 0.0)
    assert {name: config.load_job(None, [f"optimizer.name={name}"]).optimizer.learning_rate
            for name in config.OPTIMIZERS} == {"sgd": 0.001, "minibatch": 0.001, "gd": 0.05}


def test_overrides_parse_toml_values_and_bare_words():
    job = config.load_job(None, ["model.sizes=[20, 7, 5, 3]", "optimizer.lr=1e-3", "optimizer.name=gd",
                                 "run.seed=42", "data.path=/tmp/some dir", "cluster.address=10.0.0.1:6379",
                                 "optimizer.momentum=0"])
    assert job.model.sizes == (20, 7, 5, 3)
    assert job.optimizer.lr == 0.001 and job.optimizer.name == "gd" and job.optimizer.momentum == 0.0
    assert job.run.seed == 42 and job.data.path == "/tmp/some dir" and job.cluster.address == "10.0.0.1:6379"


def test_overrides_win_over_the_file_and_updates_win_over_both(tmp_path):
    path = tmp_path / "job.toml"
    path.write_text("[optimizer]\nlr = 0.5\nbatch_size = 8\n[run]\nepochs = 3\n")
    job = config.load_job(str(path), ["optimizer.lr=0.25"], {"optimizer.batch_size": 16, "run.epochs": None})
    assert (job.optimizer.lr, job.optimizer.batch_size, job.run.epochs) == (0.25, 16, None)


def test_configs_are_frozen():
    job = config.load_job()
    with pytest.raises(dataclasses.FrozenInstanceError):
        job.optimizer.lr = 1.0


def test_replace_validates():
    job = config.load_job()
    assert config.replace(job, run={"steps": 10}).run.steps == 10
    assert "cluster.workers" in one_line_error(lambda: config.replace(job, cluster={"workers": -1}))


# ------------------------------------------------------------------ TOML round trip

text = st.text(max_size=20)  # any Unicode, control characters included
jobs = st.builds(
    config.JobConfig,
    model=st.builds(config.ModelConfig, sizes=st.lists(st.integers(1, 4096), min_size=2, max_size=6).map(tuple),
                    dtype=st.sampled_from(config.DTYPES)),
    optimizer=st.builds(config.OptimizerConfig, name=st.sampled_from(config.OPTIMIZERS),
                        lr=st.none() | st.floats(1e-12, 1e6),
                        batch_size=st.integers(1, 10**6), sampling=st.sampled_from(config.SAMPLINGS),
                        momentum=st.floats(0.0, 1.0, exclude_max=True)),
    data=st.builds(config.DataConfig, dataset=text, path=st.none() | text),
    run=st.builds(config.RunConfig, name=st.from_regex(r"[A-Za-z0-9_.-]+", fullmatch=True).filter(lambda n: ".." not in n),
                  seed=st.integers(0, 2**63 - 1),
                  epochs=st.none() | st.integers(1, 10**6), steps=st.none() | st.integers(1, 10**9),
                  eval_every=st.integers(0, 10**6), log_every=st.integers(0, 10**6), run_dir=st.none() | text,
                  checkpoint_every=st.integers(0, 10**6), keep_last=st.integers(1, 100),
                  on_nonfinite=st.sampled_from(config.NONFINITE_POLICIES)),
    cluster=st.builds(config.ClusterConfig, workers=st.integers(1, 1024), address=st.none() | text,
                      placement=st.sampled_from(config.PLACEMENTS), cpus_per_worker=st.floats(1e-3, 1e3),
                      max_failures=st.integers(-1, 100), step_timeout_s=st.floats(1e-3, 1e6)),
)


@settings(max_examples=300, deadline=None)
@given(jobs)
def test_to_toml_round_trips_every_valid_job(job):
    config.validate(job)
    assert config.job_from_dict(tomllib.loads(config.to_toml(job))) == job


def test_to_toml_round_trips_through_a_file(tmp_path):
    job = config.load_job(None, ["model.sizes=[784, 32, 10]", "optimizer.lr=0.1", "run.run_dir=a \"quoted\"\\dir\n",
                                 "run.steps=7", "cluster.workers=3"])
    path = tmp_path / "job.toml"
    path.write_text(config.to_toml(job), encoding="utf-8")
    assert config.load_job(str(path)) == job


# ------------------------------------------------------------------ `distmlp train` on bad input

BAD_TRAIN_ARGS = [  # each must fail before Ray starts or anything is written
    (["--set", "optimizer.lr=-1"], "optimizer.lr"),
    (["--lr=-0.5"], "optimizer.lr"),
    (["--workers", "-1"], "cluster.workers"),
    (["--optimizer", "adam"], "optimizer.name"),
    (["--epochs", "0"], "run.epochs"),
    (["--set", "bogus.key=1"], "[bogus]"),
    (["--set", "optimizer.rate=0.1"], "optimizer.rate"),
    (["--set", "optimizer.lr"], "section.key=value"),
    (["--set", "model.sizes=[784]"], "model.sizes"),
    (["--batch-size", "9000"], "optimizer.batch_size: 9000 is larger than the 8000"),
    (["--dataset", "emnist"], "unknown data set 'emnist'"),
    (["missing-job.toml"], "missing-job.toml"),
    (["--resume", "elsewhere", "--set", "run.steps=3"], "--resume"),
]


@pytest.mark.parametrize("args, expected", BAD_TRAIN_ARGS, ids=[" ".join(a) for a, _ in BAD_TRAIN_ARGS])
def test_train_with_a_bad_value_exits_2_with_one_line_and_no_run_directory(tmp_path, monkeypatch, args, expected):
    from typer.testing import CliRunner

    from distmlp.cli import app
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    result = CliRunner().invoke(app, ["train", *args, "--run-dir", str(run_dir)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert result.stdout == ""
    assert not run_dir.exists() and not (tmp_path / "runs").exists()
