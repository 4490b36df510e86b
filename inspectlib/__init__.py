"""What the trainer and the service share: the preprocessing specification, the checkpoint format,
the device choice, statistics, dataset scanning, charts and the run status file. It imports only
``models``; ``training`` and ``app`` build on it and never on each other."""
