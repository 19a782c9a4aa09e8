"""``python -m data_tools SOURCE INPUT... --out OUTPUT`` (the same as ``align import``)."""
import sys

from data_tools.cli import main

sys.exit(main())
