"""Train a Megalodon LM: `python train.py --config tiny` (or `--config configs/<name>.py`) `[--config.key=value ...]
[--workdir DIR]`; the same as the `megalodon-train` console script (megalodon_jax/cli/train.py).

Re-running the same command resumes from the latest checkpoint in the workdir. See configs/default.py for every
field and README.md for examples.
"""

import sys

from megalodon_jax.cli.train import main

if __name__ == "__main__":
  sys.exit(main())
