"""The command: parse (no torch yet), check everything before a model loads, train; every
expected failure becomes one line on stderr and an exit code (errors.py), never a traceback."""

import logging
import sys
from typing import Optional, Sequence

from .errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_OK, TrainerError, describe_os_error, is_os_failure
from .options import PROG, parse_args


def run(argv: Optional[Sequence[str]] = None):
    """Parse, check (before any model loads), train. Returns a loop.TrainResult; raises TrainerError."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    args = parse_args(argv)
    # torch, diffusers and the network module load only now: --help and argument errors stay instant
    from .loop import Trainer
    from .preflight import check_run

    plan = check_run(args)
    return Trainer(args, plan).train()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry point (also the `tlora-train` console script); returns the exit code."""
    try:
        run(argv)
    except TrainerError as e:
        return _fail(str(e), e.exit_code, stopped=e.exit_code != EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        return _fail("interrupted; the newest state folder (if any) resumes with --resume latest", EXIT_INTERRUPTED, stopped=True)
    except Exception as e:  # noqa: BLE001 - only the kinds below are expected; anything else keeps its traceback
        if _is_format_error(e):
            return _fail(str(e), EXIT_BAD_INPUT)
        if is_os_failure(e):
            return _fail(describe_os_error(e), EXIT_BAD_INPUT)
        raise
    return EXIT_OK


def _is_format_error(error: BaseException) -> bool:
    """networks.tlora's own message for a file or network_args it cannot use (already one line)."""
    module = sys.modules.get("networks.tlora_format")
    return module is not None and isinstance(error, module.TLoRAFormatError)


def _fail(message: str, code: int, stopped: bool = False) -> int:
    one_line = " ".join(message.split())
    print(f"{PROG}: {'stopped' if stopped else 'error'}: {one_line}", file=sys.stderr)
    return code
