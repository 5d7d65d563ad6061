"""Linux plumbing: POSIX message queues, process set-up, and the handoff of payloads too
large for a queue message."""
