"""Train one DOD stage: python train.py --config configs/aio3.py --workdir runs/aio3_s1 [--config.key=value ...]

The stage is config.train.stage; stage 2 reads the stage-1 run named by train.init_from.
Running again with the same workdir continues from its latest checkpoint. A SIGTERM or Ctrl-C
saves a checkpoint at the step's end and exits with status 1 (the run is not finished)."""

import argparse
import json
import sys

from absl import logging

from dod_jax import compilation_cache
from dod_jax.configs import apply_overrides, load_config
from dod_jax.errors import reported
from dod_jax.training.loop import run


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.split("\n\n")[0],
                                     epilog="Any config value can follow as --config.<key>=<value>, "
                                            "e.g. --config.train.steps=1000 --config.data.root=data/aio3.")
    parser.add_argument("--config", default="configs/aio3.py", help="a config file (get_config())")
    parser.add_argument("--workdir", required=True, help="the run's directory (checkpoints, logs, samples)")
    parser.add_argument("--stop_at", type=int, help="stop (with a checkpoint) after this step; train.steps stays the goal")
    compilation_cache.add_argument(parser)
    args, rest = parser.parse_known_args(argv)
    unknown = [a for a in rest if not a.startswith("--config.")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    logging.set_verbosity(logging.WARNING)  # orbax reports every save step at INFO
    with reported(parser.prog):
        compilation_cache.enable(args.compilation_cache)
        config = apply_overrides(load_config(args.config), [a[len("--config."):] for a in rest])
        summary = run(config, args.workdir, stop_at=args.stop_at)
    print(json.dumps(summary))
    if summary["interrupted"]:
        print(f"{parser.prog}: stopped by a signal at step {summary['step']} of {config.train.steps} (checkpoint saved); "
              f"the same command continues it", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
