"""Train one DOD stage: python train.py --config configs/aio3.py --workdir runs/aio3_s1 [--config.key=value ...]

The stage is config.train.stage; stage 2 reads the stage-1 run named by train.init_from.
Running again with the same workdir continues from its latest checkpoint."""

import json

from absl import app, flags, logging
from ml_collections import config_flags

from dod_jax.training.loop import run

CONFIG = config_flags.DEFINE_config_file("config", "configs/aio3.py", "a config file (get_config())")
WORKDIR = flags.DEFINE_string("workdir", None, "the run's directory (checkpoints, logs, samples)", required=True)
STOP_AT = flags.DEFINE_integer("stop_at", None, "stop (with a checkpoint) after this step; train.steps stays the goal")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax reports every save step at INFO
    summary = run(CONFIG.value, WORKDIR.value, stop_at=STOP_AT.value)
    print(json.dumps(summary))


if __name__ == "__main__":
    app.run(main)
