"""Where and how a run executes: device backends and the step mode, process groups, the elastic
launcher, channels-last memory format, SIGINT/SIGTERM handling."""
