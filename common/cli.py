"""How every command-line entry point fails: one line, `error: <message>`, on stderr and exit status 2.

    if __name__ == "__main__":
        from hybrid_mamba.common.cli import run_main

        run_main(main)  # main(argv) -> int | None | anything (anything but an int exits 0)

Expected errors are the ones a user fixes without reading code: bad arguments, missing files,
unreachable services, refusals. They are

- an exception of a class defined in this repository (RecipeError, BudgetError, PublishError,
  CredentialError, CheckpointError, RunError, ...);
- OSError: missing files and folders, permissions, connections (transformers and huggingface_hub
  report a missing model folder, a missing token or offline mode this way);
- the errors of huggingface_hub's HTTP client (``huggingface_hub.errors.HTTPError``, the base of
  HfHubHTTPError and of httpx's ConnectError and timeouts, which are not OSError) and httpx's;
- a malformed input file: json.JSONDecodeError, yaml.YAMLError;
- ValueError and ImportError raised by this repository's own code (argument and config validation,
  "pip install X" messages), not from inside a library.

Anything else (TypeError, AttributeError, KeyError, a library's ValueError, ...) is a bug and keeps
its traceback. `--debug` anywhere on the command line (removed before the entry point parses its
arguments) or HYBRID_MAMBA_DEBUG=1 in the environment shows the traceback of expected errors too;
--debug sets the variable, so the processes a command starts (sweep runs, `accelerate launch`
ranks) show theirs as well. Argument parsing errors keep argparse's usage message and exit status 2.
"""

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

DEBUG_FLAG = "--debug"
DEBUG_ENV = "HYBRID_MAMBA_DEBUG"
EXIT_ERROR = 2
ROOT = Path(__file__).resolve().parents[1]
NAMESPACE = "hybrid_mamba"  # the name the folders below install under (setup.py)
PACKAGES = ("common", "configuration", "modeling", "trainers", "data_scripts", "eval_harness", "hub_cards")
# (module, class): looked up only when the module is already imported; an error of a module never
# imported cannot have been raised.
LIBRARY_ERRORS = (("huggingface_hub.errors", "HTTPError"), ("httpx", "HTTPError"), ("yaml", "YAMLError"))


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def _in_repo(filename: str | None) -> bool:
    """Whether `filename` is a source file of this repository's packages (not of .venv or a library)."""
    if not filename:
        return False
    try:
        parts = Path(filename).resolve().relative_to(ROOT).parts
    except ValueError:
        return False
    return len(parts) > 1 and parts[0] in PACKAGES


def _project_errors() -> list[type]:
    """Exception classes defined in this repository's imported modules (and in a __main__ that is one of them)."""
    found = []
    for name, module in list(sys.modules.items()):
        top = name.split(".")[1 if name.startswith(NAMESPACE + ".") else 0]
        if top not in PACKAGES and not (name == "__main__" and _in_repo(getattr(module, "__file__", None))):
            continue
        for obj in list(vars(module).values()):
            if isinstance(obj, type) and issubclass(obj, Exception) and obj.__module__ == name:
                found.append(obj)
    return found


def expected_errors() -> tuple[type, ...]:
    """Every class an entry point may report in one line; ValueError and ImportError are narrowed by `_raised_here`."""
    found = [OSError, json.JSONDecodeError, ValueError, ImportError, *_project_errors()]
    for module, name in LIBRARY_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None:
            found.append(cls)
    return tuple(found)


def _raised_here(err: BaseException) -> bool:
    """Whether the innermost frame of `err`'s traceback is this repository's code."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and _in_repo(tb.tb_frame.f_code.co_filename)


def _is_expected(err: BaseException) -> bool:
    if isinstance(err, (ValueError, ImportError)):  # a library's is a bug, unless it is also of another expected class
        others = tuple(t for t in expected_errors() if t not in (ValueError, ImportError))
        return _raised_here(err) or isinstance(err, others)
    return True


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def run_main(main: Callable[[list[str]], object], argv: list[str] | None = None) -> NoReturn:
    """Run `main(argv)` (default: the command line) and exit: its int return value, 0, or 2 on an expected error."""
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if DEBUG_FLAG in argv:
        argv = [a for a in argv if a != DEBUG_FLAG]
        os.environ[DEBUG_ENV] = "1"
    if from_command_line:
        sys.argv[1:] = argv  # what entry points record as their command
    try:
        code = main(argv)
    except expected_errors() as err:  # evaluated when an error propagates: the classes loaded by then
        if debug_enabled() or not _is_expected(err):
            raise
        sys.stdout.flush()
        print(f"error: {one_line(err)}", file=sys.stderr, flush=True)
        sys.exit(EXIT_ERROR)
    sys.exit(code if isinstance(code, int) else 0)
