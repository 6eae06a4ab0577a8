"""python -m local_stack run|serve"""

import argparse
import sys

from local_stack.runner import main_run, main_serve


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m local_stack", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="send the bundled sample runs through the pipeline and report")
    serve = sub.add_parser("serve", help="bring the stack up and keep it up")
    serve.add_argument("--port", type=int, default=3000)
    args = parser.parse_args()
    return main_run() if args.command == "run" else main_serve(args.port)


if __name__ == "__main__":
    sys.exit(main())
