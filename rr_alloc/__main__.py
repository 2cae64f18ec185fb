import signal
import sys


def _terminate(signum, frame):  # SIGTERM while torch and the rest load: one line, as during a run
    raise SystemExit("error: terminated")


signal.signal(signal.SIGTERM, _terminate)
try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch and the rest load: one line, as during a run
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)
except SystemExit as e:
    if e.code != "error: terminated":
        raise
    print("error: terminated", file=sys.stderr)
    sys.exit(143)

sys.exit(main())
