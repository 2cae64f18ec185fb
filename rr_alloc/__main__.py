import sys

try:
    from .cli import main
except KeyboardInterrupt:  # Ctrl-C while torch and the rest load: one line, as during a run
    print("error: interrupted", file=sys.stderr)
    sys.exit(130)

sys.exit(main())
