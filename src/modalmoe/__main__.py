import sys

from modalmoe.cli import main

sys.exit(main())
