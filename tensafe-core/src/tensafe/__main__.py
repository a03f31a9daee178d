"""``python -m tensafe``: the ``tensafe`` command, as torchrun's ``-m tensafe run CONFIG`` starts it."""

from __future__ import annotations

import sys

from tensafe.cli.main import main

if __name__ == "__main__":
    main(sys.argv[1:])
