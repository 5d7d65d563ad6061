"""Linux plumbing: POSIX message queues and process set-up."""
