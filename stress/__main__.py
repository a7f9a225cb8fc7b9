"""``python -m stress``: see stress/__init__.py."""

import sys

from stress.runner import main

sys.exit(main())
