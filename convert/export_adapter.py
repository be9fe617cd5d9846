"""Command-line front: `python convert/export_adapter.py POOL NAME --out DIR` ==
`hilora export-adapter ...` (a pool member, or a weighted combination, back to PEFT)."""

import sys

from hilora_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["export-adapter", *sys.argv[1:]]))
