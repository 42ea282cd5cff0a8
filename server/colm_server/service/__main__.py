"""``python -m colm_server.service serve ...``: the selector server, as ``colm-selector``."""

from colm_server.cli import selector_main

selector_main()
