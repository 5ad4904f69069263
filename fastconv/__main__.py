import sys

from fastconv.cli import main

sys.exit(main())
