"""The ``step3-jax`` command line (``python -m step3_jax.cli``): one module per subcommand."""
