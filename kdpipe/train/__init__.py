"""The one training loop: every method, every phase, every update runs here.

A method describes its training as phases (FitNets: hint then KD; Born-Again: one per generation), each a
number of epochs in which every batch takes the phase's updates in order (adversarial: discriminator then
student; DML: peer by peer). An update names the modules it trains, its loss and its optimizer settings.
The parts: `settings` (TrainerSettings, how the loop trains), `steps` (Batch, Update, Phase, prefetching),
`optim` (optimizers, warm-up and cosine schedules, the step: accumulation, fp16 scaler, clipping), `serving`
(the teacher: cached, views or online), `checkpoints` (phase checkpoints and method checkpoints), `metering`
(epoch metrics and timings), `ema` (the EMA of evaluated models) and `loop` (the Trainer).

Under torchrun every rank draws the same permutation and takes its share of each batch (`data.batch_size`
stays the global batch); each update's gradients are averaged over ranks before its optimizer steps, and
the epoch metrics are summed over ranks. Finiteness is checked once per epoch, from a flag kept on the
device, so a step never waits for the host. On CUDA the next batch is prepared on a side stream while the
current step runs, and `compile: true` replays each compiled forward and backward as a CUDA graph, on batches of
one shape (the last partial batch of each epoch is dropped and the report says how many samples that leaves out).
"""

from kdpipe.train.checkpoints import load_method, save_method
from kdpipe.train.loop import Trainer
from kdpipe.train.optim import make_optimizer
from kdpipe.train.settings import TrainerSettings, resolve_precision
from kdpipe.train.steps import Batch, LossFn, Phase, Update, _tensors, full_precision, prefetched

__all__ = ["Batch", "LossFn", "Phase", "Trainer", "TrainerSettings", "Update", "_tensors", "full_precision",
           "load_method", "make_optimizer", "prefetched", "resolve_precision", "save_method"]
