"""taskpool.Executor: the client in the caller's process, and its host process."""
