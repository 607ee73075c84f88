"""``python -m celeriac`` is the ``celeriac`` command."""

from .cli import main

main()
