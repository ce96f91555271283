"""TeleLoRA TrojAI submission: ``python entrypoint.py {configure,mitigate,test} --help``."""

import sys

from telelora.cli import main

if __name__ == "__main__":
    sys.exit(main())
