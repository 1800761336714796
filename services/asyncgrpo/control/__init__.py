"""The control plane: pause, resume, drain, stop and inspect live runs (REST under /v1, dashboard, CLI).

It holds no state of its own: every answer is read from the run's keys in Redis, so it can restart at any
time and the run goes on without it."""
