"""``python -m gateway.cli``: the ``l402-gateway`` command."""

import sys

from gateway.cli import main

sys.exit(main())
