"""The command line the parity generators share: ``--reference`` names a checkout of the official code."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def reference_checkout(description: str, repository: str) -> Path:
    """Parse ``--reference`` (a checkout of github.com/``repository``), put it first on ``sys.path`` so
    that the official modules import, and return its folder."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--reference", required=True, help=f"a checkout of github.com/{repository}")
    root = Path(parser.parse_args().reference).resolve()
    sys.path.insert(0, str(root))
    return root
