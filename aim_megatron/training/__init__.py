"""Pre-training: the ``aim-pretrain`` command and its loop, one component per module.

- ``main``: the command: arguments, logging, start-up, exit codes for each error (``main(argv)``).
- ``trainer``: ``Trainer``, the loop itself (build, resume, train_step, evaluate, run, save, close)
  and ``TrainingDiverged``.
- ``batches``: which ranks read images, the training/validation loaders, micro-batches with their
  prefix lengths, and agreeing on a reading rank's error (``DataError``).
- ``optim``: the warmup + cosine learning-rate schedule and the optimizer step that skips
  non-finite updates.
- ``metrics``: ``MetricsLogger``: metrics.jsonl, TensorBoard, the tqdm bar and rank 0's log lines.
- ``checkpointing``: ``CheckpointSaver``: saves in the background (megatron-core's async queue) or
  at once, published between steps once every rank's write is complete, with each save's stall.
- ``run_lock``: the single-writer lock of train.output_dir (an O_EXCL-style hard-linked lock file,
  a heartbeat, stale and same-Slurm-job takeover).
- ``restarts``: what a job does after its training step ends (done, stop, requeue, relaunch in the
  allocation), with a restart budget and crash-loop detection; the sbatch scripts call it.
- ``preemption``: stop signals (recorded, never fatal), dying with the launcher, the signal-proof
  checkpoint writer, and ``StopRequests``: the checkpoint and marker of a requeue. Imports no torch.
- ``startup``: the start-up summary (sizes, estimated time, the failure-rate checkpoint interval,
  absurd-run warning), settling train.save_interval=auto, and preflight checks.
- ``watchdog``: the hang watchdog (heartbeats, stacks, the stuck rank named, exit 3).
- ``exit_codes``: 0 ok, 1 bad input, 2 diverged, 3 requeue.
- ``plot_metrics``: a run's loss and lr curves to PNG (``aim-plot-metrics``).
"""
