"""`pqcad-export refstats`: Inception reference statistics of a data set (FID mu/sigma + a KID feature subset)."""

from __future__ import annotations

import click

from ..cli import friendly, main


@main.command()
@click.option("--images", required=True,
              help="fashion-mnist (the built-in teacher's data: 60k training images padded to 32x32), an image "
                   "folder, an .npy/.npz uint8 array, or an idx file")
@click.option("--out", required=True, type=click.Path(), help="output folder (refstats.npz + refstats.json)")
@click.option("--device", default="cpu", show_default=True, help="cpu | cuda (60k images: ~minutes on a GPU, "
              "hours on a CPU)")
@click.option("--limit", default=None, type=int, help="only the first N images (smoke runs, tests)")
@click.option("--subset", default=1000, show_default=True, help="feature rows kept for KID (seeded choice)")
@click.option("--sigma-dtype", default="float16", show_default=True, type=click.Choice(["float16", "float32"]),
              help="storage of sigma's upper triangle (its diagonal is always float64)")
@click.option("--size", default=32, show_default=True, help="image folders are resized to SIZE x SIZE")
@click.option("--channels", default=1, show_default=True, type=click.Choice(["1", "3"]))
@click.option("--fid-weights", default=None, type=click.Path(), help="TF-Inception default_1.pt")
@click.option("--batch-size", default=None, type=int, help="Inception batch (default 500 on cuda, 16 on cpu)")
@click.option("--quiet", is_flag=True)
@friendly
def refstats(images, out, device, limit, subset, sigma_dtype, size, channels, fid_weights, batch_size, quiet):
    """Compute the statistics `compare` scores fid and kid against, into a folder with a checksummed sidecar.

    The shipped asset (pqcad_export/assets/fid_reference/fashion-mnist-train) is made with
    `pqcad-export refstats --images fashion-mnist --out DIR --device cuda` (full FP32 convolutions, so the
    features equal the CPU ones). For your own model, `compare/build --ref-images DIR` does this and caches it.
    """
    from ..errors import UsageError
    from ..metrics.refstats_cli import make_refstats

    for flag, v in (("--batch-size", batch_size), ("--size", size)):
        if v is not None and v < 1:
            raise UsageError(f"{flag} must be >= 1, got {v}")
    if limit is not None and limit < 2:
        raise UsageError(f"--limit must be >= 2, got {limit}")
    if subset < 0:
        raise UsageError(f"--subset must be >= 0, got {subset}")
    side = make_refstats(images, out, device, limit, fid_weights, batch_size, subset, sigma_dtype, size=size,
                         channels=int(channels), quiet=quiet)
    err = side.get("storage_fid_error")
    click.echo(f"{out}: {side['count']} images, {side['bytes'] / 1e6:.2f} MB, sha256 {side['sha256'][:12]}, "
               f"FID error of the stored sigma {err if err is not None else '—'}, {side['seconds']} s")
