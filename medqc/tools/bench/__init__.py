"""``medqc bench``: ingest, inference and end-to-end throughput, side by side, in one run, on one study.

Sections (each a function; each either runs or says why it was skipped):

  a. ``storescp``     DCMTK storescu → storescp (receive and write): this machine's ingest ceiling
  b. ``agent_receive`` storescu → ``medqc agent`` with inference off: what the agent's ingest costs
  c. ``agent_full``    storescu → ``medqc agent`` full pipeline (slices analysed per second), then
                       ``medqc replay`` at 60 slices/s: slice → result latency and last slice → verdict
  d. ``inference``     each available backend alone on the decoded slices, the model's preprocessing
                       included (ONNX Runtime fp32, INT8 when the bundle has it, torch eager, and GPU
                       backends where ``medqc.runners`` offers them)
  e. ``naive``         per slice: pydicom decode + preprocessing and network in torch eager at batch 1

All sections use the same study (``medqc synth`` at 512², or a water-phantom series when the synth
module is not installed). Results: a table on stdout with ratios to (a) and (e), and JSON + PNG + a
Markdown table under ``--out`` (default ``bench/results``) named after the machine (GPU name, or
``cpu-<N>core``), with the machine description.

One module per job: ``study`` (the study), ``harness`` (the agent as a subprocess, read through its store),
``ingest`` (a–c), ``micro`` (d, e), ``report`` (section records, machine, table, targets, Markdown, PNG),
``cli`` (``run_bench()``, options) and ``soak`` (``--soak``: a real agent under sustained load from real
senders, its own run and report).
"""
