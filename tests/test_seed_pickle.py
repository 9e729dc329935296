"""Seed pickle round trip: distmlp trains, exports weights_biases.pkl, the seed's own code scores it."""

import gzip
import json
import pickle
import struct
from array import array

import numpy as np
import pytest
from typer.testing import CliRunner

import seed_reference as seed
from distmlp import checkpoint, config, data, trainer
from distmlp.checkpoint import CheckpointError
from distmlp.cli import app

runner = CliRunner()


def seed_load_and_preprocess_data(images_filepath, labels_filepath):
    """The seed's load_and_preprocess_data (file reading as in the notebook; pixels via seed_reference)."""
    with open(labels_filepath, 'rb') as file:
        magic, size = struct.unpack(">II", file.read(8))
        if magic != 2049:
            raise ValueError(f'Magic number mismatch, expected 2049, got {magic}')
        labels = array("B", file.read())
    with open(images_filepath, 'rb') as file:
        magic, size, rows, cols = struct.unpack(">IIII", file.read(16))
        if magic != 2051:
            raise ValueError(f'Magic number mismatch, expected 2051, got {magic}')
        image_data = array("B", file.read())
    return seed.preprocess_images(image_data, size, rows, cols), labels


def seed_unpack():
    """The seed's unpack(): pickle.load of nn/weights_biases.pkl in the working directory."""
    with open('nn/weights_biases.pkl', 'rb') as f:
        weights_biases_g = pickle.load(f)
    return seed.unpack(weights_biases_g)


@pytest.fixture(scope="module")
def held_out_digits(tmp_path_factory):
    """The bundled sample's held-out rows (8000-9999), read the seed's way from raw IDX files."""
    raw = tmp_path_factory.mktemp("idx")
    split = data.resolve("mnist-sample").test
    for name, src in (("test-images", split.images), ("test-labels", split.labels)):
        (raw / name).write_bytes(gzip.open(src).read())
    images, labels = seed_load_and_preprocess_data(raw / "test-images", raw / "test-labels")
    return images[split.offset:], labels[split.offset:]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """300 minibatch steps on the bundled sample, float64, checkpointed every 100."""
    run_dir = tmp_path_factory.mktemp("run")
    job = config.replace(config.JobConfig(), model={"dtype": "float64"}, optimizer={"lr": 0.1},
                         run={"steps": 300, "checkpoint_every": 100, "seed": 1})
    backend = trainer.LocalBackend(data.resolve("mnist-sample"), np.float64)
    trainer.train(job, backend, hooks=[checkpoint.CheckpointHook(run_dir, job)])
    return run_dir


def test_seed_code_scores_the_export_as_distmlp_does(tmp_path, monkeypatch, trained_run, held_out_digits):
    (tmp_path / "nn").mkdir()
    result = runner.invoke(app, ["checkpoint", "export", str(trained_run), "--format", "seed-pickle",
                                 "-o", str(tmp_path / "nn" / "weights_biases.pkl")])
    assert result.exit_code == 0, result.output
    monkeypatch.chdir(tmp_path)
    weights, biases = seed_unpack()

    with open("nn/weights_biases.pkl", "rb") as f:
        raw = pickle.load(f)
    assert type(raw) is dict and list(raw) == list(seed.PICKLE_KEYS)
    assert [(len(w), len(w[0])) for w in weights] == [(16, 784), (16, 16), (10, 16)]
    assert [len(b) for b in biases] == [16, 16, 10]
    assert all(type(v) is float for w in weights for row in w for v in row)
    assert all(type(v) is float for b in biases for v in b)

    images, labels = held_out_digits
    seed_accuracy = seed.test_neural_network(images, labels, weights, biases)  # percent
    result = runner.invoke(app, ["evaluate", str(trained_run), "--dataset", "mnist-sample", "--json"])
    assert result.exit_code == 0, result.output
    ours = json.loads(result.stdout)
    assert ours["n"] == len(labels) == 2000
    assert round(ours["test_accuracy"] * ours["n"]) == round(seed_accuracy * len(labels) / 100)
    assert ours["test_accuracy"] > 0.8  # a trained model, not a tie between two random ones


def test_import_back_gives_the_same_arrays(tmp_path, trained_run):
    _, ckpt = checkpoint.resolve(trained_run)
    pkl = checkpoint.export_seed_pickle(ckpt, tmp_path / "weights_biases.pkl")
    back = checkpoint.load(checkpoint.import_seed_pickle(pkl, tmp_path / "imported"))
    assert back.step == 0 and back.job.model.dtype == "float64" and back.sampler is None
    for name, p in ckpt.params.items():
        assert back.params[name].dtype == np.float64
        assert back.params[name].tobytes() == p.tobytes()


def test_a_seed_made_pickle_imports_and_evaluates(tmp_path, held_out_digits):
    """A dict made exactly as the seed's init cell makes it: import, evaluate, compare with the seed."""
    import random
    weights_biases = seed.fresh_weights_biases(random.Random(5))
    pkl = tmp_path / "weights_biases.pkl"
    pkl.write_bytes(pickle.dumps(weights_biases))
    result = runner.invoke(app, ["checkpoint", "import", str(pkl), "-o", str(tmp_path / "ck")])
    assert result.exit_code == 0, result.output
    params = checkpoint.resolve(tmp_path / "ck")[1].params
    for name, key in zip(("W1", "b1", "W2", "b2", "W3", "b3"), seed.PICKLE_KEYS):
        np.testing.assert_array_equal(params[name], np.array(weights_biases[key]))
    images, labels = held_out_digits
    seed_accuracy = seed.test_neural_network(images[:300], labels[:300], *seed.unpack(weights_biases))
    ckpt = checkpoint.resolve(tmp_path / "ck")[1]
    x, y = data.load_rows(data.resolve("mnist-sample").test, 0, 300)
    correct = int(np.sum(trainer.mlp.predict(ckpt.params, trainer.mlp.scale_pixels(x, np.float64)) == y))
    assert correct == round(seed_accuracy * 3)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("biases_output"), r"missing keys \['biases_output'\]"),
    (lambda d: d.update(extra=[1.0]), r"unexpected keys \['extra'\]"),
    (lambda d: d.update(biases_hidden1=[0.0] * 15), r"biases_hidden1 has shape \[15\], expected \[16\]"),
    (lambda d: d["weights_hidden1_to_hidden2"][3].pop(), "weights_hidden1_to_hidden2 is not a rectangular"),
    (lambda d: d.update(biases_hidden2=["a"] * 16), "biases_hidden2 is not a rectangular list of numbers"),
    (lambda d: d["biases_output"].__setitem__(0, float("nan")), "biases_output has non-finite values"),
    (lambda d: d["biases_output"].__setitem__(0, 10 ** 400), "biases_output holds an int past float64's range"),
])
def test_malformed_seed_dicts_are_refused_by_key(tmp_path, mutate, message):
    import random
    weights_biases = seed.fresh_weights_biases(random.Random(0))
    mutate(weights_biases)
    pkl = tmp_path / "weights_biases.pkl"
    pkl.write_bytes(pickle.dumps(weights_biases))
    with pytest.raises(CheckpointError, match=message) as e:
        checkpoint.import_seed_pickle(pkl, tmp_path / "ck")
    assert str(pkl) in str(e.value)
    assert not (tmp_path / "ck").exists()


def test_import_refuses_non_seed_job_sizes(tmp_path):
    job = config.replace(config.JobConfig(), model={"sizes": [784, 32, 10]})
    with pytest.raises(CheckpointError, match="a seed pickle is a 784-16-16-10 model"):
        checkpoint.import_seed_pickle(tmp_path / "w.pkl", tmp_path / "ck", job=job)
