"""Client CLI tests: `svfit jobs|files|artifacts|chat` run as subprocesses against a real `svfit serve`."""
