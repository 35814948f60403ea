"""`python -m vlmjax.eval`: evaluate a checkpoint or a pretrained model (see vlmjax/evals/cli.py)."""
import sys

from vlmjax.evals.cli import main

if __name__ == "__main__":
    sys.exit(main())
