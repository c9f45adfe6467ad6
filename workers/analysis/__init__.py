"""Pure analysis core: functions over tensors and models. No Redis, no HTTP, no file paths."""
