"""``python -m idem_middleware.cli``: the ``idem-middleware`` command."""

import sys

from idem_middleware.cli import main

sys.exit(main())
