"""The ``mrivq`` command: the typer app and its error boundary, one module per command group."""
