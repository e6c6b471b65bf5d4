"""Files and the outside world: atomic writes, the cache directory, the HTTP fetcher, progress bars,
TensorBoard and metrics.jsonl, the run directory's lock and ownership rules."""
