"""Command-line front: `python convert/convert_model.py ...` == `hilora convert-model ...`.

Thin argument parsing only; the work is done by `hilora_jax` (see `hilora_jax/cli.py`).
"""

import sys

from hilora_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-model", *sys.argv[1:]]))
