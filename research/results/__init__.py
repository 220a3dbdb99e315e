"""The paper's tables on the built-in teacher (issues 4, 5, 8, 9): one resumable job graph.

Jobs (calibration sets, quantized models, CAD students, 10k-sample evaluations, metrics) each write into their own
folder under --work and a `done.json` when finished, so a rerun skips what is done and a killed job restarts from
its own checkpoints (per block in quantization, every N iterations in CAD). Quantization and CAD jobs run as
parallel subprocesses (the teacher is small: one process leaves a GPU mostly idle), evaluations a few per GPU.
An evaluation samples at once and computes features when the TF-Inception weights exist (--weights); data metrics
wait for the reference images (--data): both may arrive, in parts, while training jobs already run. `--only`
restricts a run to some rows (with their dependencies); a scheduler started again on the same --work leaves the
jobs of its predecessor running (research/results_device.sh does this between device calls).

    python -m research.results run --work /tmp/res --plan gpu --weights default_1.pt --data train-images-idx3-ubyte.gz
    python -m research.results status --work /tmp/res
    python -m research.results collect --work /tmp/res --out DIR      # results.json + figures
    python -m research.results tables --results docs/results/results.json --md docs/RESULTS.md
    python -m research.results run --work /tmp/smoke --plan smoke     # the same graph at CPU-test scale

Needs torch, diffusers, numpy, scipy, safetensors, pot (+ this repository); no rich, no click, no onnxruntime.
Modules: `plan` (budgets and the job graph), `jobs` (job bodies), `scheduler` (run / status), `collect`,
`tables` (Markdown), `cli` (the argparse front end).
"""

