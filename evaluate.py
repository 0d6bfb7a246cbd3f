"""Evaluate a trained DOD, restore a folder, or time restores: see dod_jax/evaluation/run.py.

    python evaluate.py --ckpt runs/x/stage2 --data data/aio3 --out runs/x/eval
"""

import sys

from dod_jax.evaluation.run import main

if __name__ == "__main__":
    sys.exit(main())
