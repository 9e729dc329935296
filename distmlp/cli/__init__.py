"""The `distmlp` command. Each command parses its options and calls one plain function.

The app lives in cli/app.py; each sibling module (train_cmd, data_cmd, ...) adds its commands
to it when imported here. This package is the only place that imports typer.
"""

from distmlp.cli import data_cmd, train_cmd, checkpoint_cmd, jobs_cmd, plot_cmd, sweep_cmd  # noqa: F401,I001  (registers them, in this order)
from distmlp.cli.app import app, user_errors  # noqa: F401  (the console script is distmlp.cli:app)
