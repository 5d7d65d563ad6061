try:
    from taskpool.cli import entry_point
except KeyboardInterrupt:  # Ctrl-C while the modules load: as entry_point's, no traceback
    raise SystemExit(130) from None

entry_point()
