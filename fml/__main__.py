import sys

from fml.cli import main

sys.exit(main())
