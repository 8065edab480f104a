"""`--plugin stop_in_pass_plugin` (tests/test_stop_stages.py): every rank sends itself SIGTERM after the first
batch of a training-set pass, as SLURM or torchrun deliver a stop signal to every worker mid-stage."""

import os
import signal

from qpm_dist.stages import train_pass

_original = train_pass.model_outputs


def _outputs(*args, **kwargs):
    for i, item in enumerate(_original(*args, **kwargs)):
        if i == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        yield item


train_pass.model_outputs = _outputs
