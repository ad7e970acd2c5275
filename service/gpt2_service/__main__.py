"""``python -m gpt2_service``: the same as ``gpt2-serve``."""

from gpt2_service.main import main

main()
