"""``python -m step3_jax.cli``: the same as the ``step3-jax`` console script."""

import sys

from step3_jax.cli.app import main

sys.exit(main())
