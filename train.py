r"""Train a LLaVA model: the run is described by a config file (see configs/train_*.py).

  python train.py --config=configs/train_tiny.py:synthetic --workdir=/tmp/run
  python train.py --config=configs/train_tiny.py:synthetic --workdir=/tmp/run \
      --config.num_steps=1000 --config.optim.accum_steps=4

Rerunning with the same --workdir resumes from its latest complete checkpoint. With
--export_only, writes that checkpoint's params as a Hugging Face directory and exits.

SIGTERM or SIGINT (a preempted VM, Ctrl-C) saves the step in progress and exits with
128 + the signal's number; a NaN or infinite loss stops the run (exit 1) before that
step is saved. One run at a time holds a workdir (WORKDIR/.lock).

On several hosts every host runs the same command with --distributed=auto (a TPU pod
slice) or --coordinator_address/--num_processes/--process_id, and the same --workdir
on a file system all of them see; data.batch_size is then per host and data.num_epochs
stays unset (README, "Several hosts").
"""

import os
import sys

from absl import flags, logging

from tokred_jax import cli
from tokred_jax.train import trainer

_CONFIG = cli.define_config("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard events and the "
                               "exported model go here.", required=True)
_EXPORT_ONLY = flags.DEFINE_bool("export_only", False, "Export the latest checkpoint and "
                                 "exit.")
cli.define_distributed_flags()


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:  # Orbax logs every save at INFO.
    logging.set_verbosity(logging.WARNING)
  if _EXPORT_ONLY.value:
    print(f"exported to {trainer.export(_CONFIG.value, _WORKDIR.value)}")
    return
  try:
    trainer.train(_CONFIG.value, _WORKDIR.value)
  except trainer.Stopped as e:
    print(f"{os.path.basename(sys.argv[0])}: {e}", file=sys.stderr)
    sys.exit(e.exit_code)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  cli.run(main)
