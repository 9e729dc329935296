"""cluster.yaml passes Ray's own schema validation and keeps the cluster off the internet."""

import re
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

PATH = Path(__file__).resolve().parents[1] / "cluster.yaml"


@pytest.fixture(scope="module")
def text():
    return PATH.read_text()


@pytest.fixture(scope="module")
def cfg(text):
    return yaml.safe_load(text)


def test_passes_rays_schema_validation(cfg):
    prepared = prepare_config(cfg)  # merges Ray's AWS defaults, then validates, as `ray up` does
    validate_config(prepared)
    assert prepared["head_node_type"] == "head"
    assert prepared["available_node_types"]["worker"]["max_workers"] == 4


def test_rays_validation_is_not_a_no_op(cfg):
    with pytest.raises(Exception, match="distmlp_unknown_key"):
        validate_config(prepare_config({**cfg, "distmlp_unknown_key": 1}))


def test_nothing_opens_to_the_whole_internet(text, cfg):
    assert "0.0.0.0" not in text and "::/0" not in text
    # Ray's launcher creates its own group with SSH from 0.0.0.0/0 for any node type without one
    for name, node_type in cfg["available_node_types"].items():
        assert node_type["node_config"]["SecurityGroupIds"] == ["sg-REPLACE_ME"], name
    assert "security_group" not in cfg["provider"]


def start_commands(cfg):
    return [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]


def test_token_auth_on_every_node_and_the_token_shipped(cfg):
    assert len(start_commands(cfg)) == 2
    for command in start_commands(cfg):
        assert "RAY_AUTH_MODE=token ray start" in command
    assert cfg["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}


def test_dashboard_and_jobs_api_only_on_the_heads_loopback(cfg):
    head = [c for c in cfg["head_start_ray_commands"] if "ray start" in c]
    assert len(head) == 1 and "--dashboard-host=127.0.0.1" in head[0]
    assert not any("--dashboard-host" in c for c in cfg["worker_start_ray_commands"])


def test_setup_installs_a_pinned_distmlp_and_the_same_ray(cfg):
    import ray
    install = " ".join(c for c in cfg["setup_commands"] if "pip install" in c)
    assert re.search(r'"distmlp @ git\+https://\S+\.git@DISTMLP_REF"', install)  # a tag or commit, not a branch
    assert f'"ray[default]=={ray.__version__}"' in install


def test_the_copied_token_is_readable_by_its_owner_only(cfg):
    chmod = cfg["setup_commands"][0]  # file_mounts are copied before setup_commands run
    assert chmod.split("#")[0].strip() == "chmod 700 ~/.ray && chmod 600 ~/.ray/auth_token"
    assert list(cfg["file_mounts"]) == ["~/.ray/auth_token"]


def test_warns_that_jobs_inherit_the_nodes_cloud_role(text):
    header = text.split("cluster_name:")[0]
    assert "inherit its cloud role" in header and "least-privilege instance profile" in header


def test_every_key_has_a_comment(text):
    for n, line in enumerate(text.splitlines(), 1):
        if re.match(r"^\s*[\w~./-]+:", line) and not line.lstrip().startswith("#"):
            previous = text.splitlines()[n - 2].strip() if n > 1 else ""
            assert "#" in line or previous.startswith("#") or line.rstrip().endswith(":"), f"line {n}: {line}"


def test_placeholders_are_marked(text):
    assert text.count("REPLACE_ME") >= 6
    for value in re.findall(r"\b(?:ami|sg)-\w+", text):
        assert value.endswith("REPLACE_ME"), value
