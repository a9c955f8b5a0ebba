"""The `msflow` command: the composition root that wires the offline trainer (models/) and the service (service/)."""
