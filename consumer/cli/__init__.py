"""The ``phasewatch`` command line: ``main`` (serve, send, tasks, dead letters) and
``replay`` (import, export, replay kafka, rebuild, replay handlers). Terminal concerns
only: the work is done by the packages below."""
