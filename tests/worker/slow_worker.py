"""Test launcher: `svfit worker` with every training step slowed by $SVFIT_TEST_STEP_DELAY_S seconds, so a
test can kill the worker mid-run. Nothing else differs from the real command."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from svfit_cli import main  # noqa: E402
from worker.reporting import JobReporter  # noqa: E402

_delay = float(os.environ.get("SVFIT_TEST_STEP_DELAY_S", "0"))
_on_step = JobReporter.on_step


def _slow_on_step(self, metrics):  # noqa: ANN001
    _on_step(self, metrics)
    time.sleep(_delay)


JobReporter.on_step = _slow_on_step

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
