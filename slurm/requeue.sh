# Sourced by the training sbatch scripts: run the job step, pass SLURM's early-warning signal on to it, and
# requeue the job when a stop signal ended the step (exit status 75).
#
# Timing. `#SBATCH --signal=B:USR1@90` makes SLURM send SIGUSR1 to this batch shell (B:) 90 s before the
# time limit — and at preemption too if the cluster sets SlurmctldParameters=preempt_send_user_signal.
# The trap below forwards it to srun, which passes it to every task of the step: `qpm-dist launch --run`
# (torchrun) hands it to its workers; every rank finishes its current step, writes a checkpoint and exits
# 75; torchrun waits for that at most --shutdown-timeout seconds (60) before it sends SIGKILL. Then we
# requeue, before SLURM's own SIGTERM (at the limit) and SIGKILL (KillWait later) arrive. So keep
#     checkpoint write time  <  --shutdown-timeout  <  the @ seconds of --signal (minus a few for requeue).
#
# A requeued job is held about 2 minutes before it may start again (SLURM keeps it pending for the job
# credential's lifetime, AuthInfo cred_expire, default 120 s; measured on 22.05: 121 s).
#
# Requeue only on 75, the engine's "stopped by a stop signal, run the same command again" (a training stage
# saved a checkpoint and resumes from it, any other stage saved nothing and restarts; 0 is
# finished, anything else is a failure that a rerun would repeat), and at most MAX_REQUEUES times:
# SLURM_RESTART_COUNT counts how often this job was requeued, so a run that is stopped again and again
# without finishing cannot loop forever.

MAX_REQUEUES=${MAX_REQUEUES:-20}
PREEMPTED_EXIT_CODE=75

# run_step CMD...: run CMD (an srun) in the background, forward SIGUSR1 to it, return its exit status.
run_step() {
  local pid rc forwarded=
  "$@" &
  pid=$!
  # Without the trap, SIGUSR1 would kill this shell (its default action) and nothing would requeue.
  trap 'echo "$(date +%T) batch script: SIGUSR1 received, asking the job step to checkpoint and stop" >&2
        forwarded=1; kill -USR1 "$pid" 2>/dev/null' USR1
  while :; do
    rc=0
    wait "$pid" || rc=$?
    # A trapped signal makes `wait` return at once (status > 128) while the step is still stopping:
    # wait again for the step's own exit status.
    if [[ -n $forwarded ]]; then
      forwarded=
      continue
    fi
    break
  done
  trap '' USR1  # the step has ended: a late signal must not kill this shell before it requeues
  return "$rc"
}

# requeue_or_exit STATUS: requeue this job on 75 (within MAX_REQUEUES), else end the batch script with STATUS.
requeue_or_exit() {
  local rc=$1 count=${SLURM_RESTART_COUNT:-0}
  if (( rc != PREEMPTED_EXIT_CODE )); then
    echo "$(date +%T) batch script: job step ended with exit status $rc" >&2
    exit "$rc"
  fi
  if (( count >= MAX_REQUEUES )); then
    echo "$(date +%T) batch script: stopped by a stop signal (exit 75), but this job was requeued $count times" \
         "already (MAX_REQUEUES=$MAX_REQUEUES): not requeueing; submit it again to continue (see the step's" \
         "\"stopped ...\" lines above for what was saved)" >&2
    exit "$rc"
  fi
  echo "$(date +%T) batch script: job step stopped by a stop signal (exit 75: a training stage saved a" \
       "checkpoint, any other unfinished stage restarts; its \"stopped ...\" lines above say which)" >&2
  # An array task is requeued as ARRAYID_TASKID. Its own SLURM_JOB_ID is not enough: one task of every array
  # keeps the array's job id, and `scontrol requeue <that id>` requeues the whole array (running tasks are
  # killed "DUE TO JOB REQUEUE", finished ones rerun).
  local target=$SLURM_JOB_ID what="job $SLURM_JOB_ID"
  if [[ -n ${SLURM_ARRAY_JOB_ID:-} && -n ${SLURM_ARRAY_TASK_ID:-} ]]; then
    target=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
    what="array task $target (job $SLURM_JOB_ID)"
  fi
  echo "$(date +%T) batch script: requeueing $what" \
       "($((count + 1)) of at most $MAX_REQUEUES)" >&2
  if scontrol requeue "$target"; then
    exit 0
  fi
  echo "$(date +%T) batch script: scontrol requeue failed (was the job submitted with --requeue?)" >&2
  exit "$rc"
}
