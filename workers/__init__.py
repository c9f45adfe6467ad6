"""vitaudit workers: the RQ job entry point and the pure analysis core under it."""
