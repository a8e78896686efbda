"""queue room: the JobQueue interface and its backends."""
