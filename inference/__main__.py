import sys

from inference.cli import script

sys.exit(script())
