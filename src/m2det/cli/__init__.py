"""The `m2det` command line: one module per subcommand, assembled in `main`."""
