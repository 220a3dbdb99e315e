"""`pqcad-export` command line: thin wrappers over the library; every failure is one line and a non-zero exit.

Exit codes: 0 success, 1 a failure the tool explains, 2 bad usage, 3 a missed --gate, 130 Ctrl-C, 143 SIGTERM.
Each command imports its implementation lazily so `--help` stays fast.
"""

from __future__ import annotations

import sys
from functools import wraps

import click

from .config_base import Preset, choices
from .errors import PqcadError

PRESETS = click.Choice(choices(Preset))
MODEL_HELP = "diffusers UNet directory (model or pipeline layout); default: the built-in Fashion-MNIST teacher"


def quality_options(fn):
    """--ref-images and --gate, shared by `build` and `compare` (one spelling of both)."""
    fn = click.option("--gate", "gates", multiple=True, metavar="METRIC>=X|METRIC<=X",
                      help="quality gate on the candidate's compare.json metric, repeatable (e.g. --gate "
                           "\"psnr_to_fp32>=30\" --gate \"kid_to_fp32<=0.002\"); a missed gate exits 3 after the "
                           "report is written")(fn)
    return click.option("--ref-images", default=None, type=click.Path(),
                        help="data images for fid/kid (folder, .npy/.npz, or 'fashion-mnist'), statistics cached by "
                             "content; the built-in teacher ships its own")(fn)


def cond_option(scope: str):
    """--cond for a UNet2DConditionModel; `scope` says where the embeddings are used."""
    return click.option("--cond", default=None, type=click.Path(),
                        help="UNet2DConditionModel: encoder_hidden_states [N, tokens, cross_attention_dim] "
                             f"(safetensors) {scope}; row i mod N for sample i; default: seeded N(0,1) embeddings, "
                             "labelled as such")


def _fail(msg: str, code: int) -> None:
    click.echo(f"error: {msg}", err=True)
    sys.exit(code)


def friendly(fn):
    """Turn PqcadError (and KeyboardInterrupt) into one line + exit code, never a traceback."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from .interrupts import Terminated, terminate_as_interrupt

        restore = terminate_as_interrupt()  # SIGTERM ends like Ctrl-C: one line, work kept, resumable
        try:
            return fn(*args, **kwargs)
        except PqcadError as exc:
            _fail(str(exc), exc.exit_code)
        except Terminated:
            _fail("terminated (SIGTERM); finished stages and checkpoints are kept (rerun to resume)", 143)
        except KeyboardInterrupt:
            _fail("interrupted; finished stages and checkpoints are kept (rerun to resume)", 130)
        except OSError as exc:  # a full disk, a permission change mid-run: still one line
            where = f": {exc.filename}" if getattr(exc, "filename", None) else ""
            _fail(f"{exc.strerror or exc}{where}", 1)
        except MemoryError:
            _fail("out of memory; try a smaller --batch-size or the quick preset", 1)
        finally:
            restore()

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pqcad-export")
def main() -> None:
    """Quantize (PQ) and distill (CAD) a diffusion UNet, export QDQ ONNX, build TensorRT / OpenVINO /
    ONNX Runtime engines and compare them with the FP32 100-step model and its FP engines.

    Typical use:  pqcad-export build --bits w4a8
    """


# Each subcommand lives in pqcad_export/commands/<name>.py and registers itself on `main`.
from . import commands  # noqa: E402,F401
