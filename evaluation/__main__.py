import sys

from evaluation.cli import script

sys.exit(script())
