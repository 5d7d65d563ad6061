from taskpool.cli import entry_point

entry_point()
