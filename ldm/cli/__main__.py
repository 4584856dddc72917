import sys

from ldm.cli import main

sys.exit(main())
