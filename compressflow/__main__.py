"""``python -m compressflow``: the same as the ``compressflow`` command."""

from compressflow.cli import main

main()
