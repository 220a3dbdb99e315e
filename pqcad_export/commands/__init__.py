"""One module per subcommand; importing this package registers them all on `pqcad_export.cli.main`."""

import importlib

for _name in ("calibrate", "quantize", "distill", "export", "lint", "engine", "compare", "build", "refstats", "bench"):
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as exc:  # a command whose module has not landed yet
        if exc.name != f"{__name__}.{_name}":
            raise
