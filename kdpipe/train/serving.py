"""How the frozen teacher is served to a method: cached outputs, teacher views, or online on every batch."""

from __future__ import annotations

import math
import time
from typing import Any

from torch import nn

from kdpipe.taps import Outputs
from kdpipe.teacher_cache import TeacherOutputCache, teacher_pass
from kdpipe.teacher_views import TeacherViews, teacher_views
from kdpipe.train.settings import TrainerSettings
from kdpipe.train.steps import TeacherFn


class TeacherServing:
    """Chooses, per teacher a method reads, how its outputs reach the loss, and records the choice and why
    (`modes`, report.json's distill.teacher)."""

    def __init__(self, data, settings: TrainerSettings, seed: int, batch_size: int, autocast_dtype,
                 channels_last: bool):
        self.data = data
        self.settings = settings
        self.batch_size = batch_size  # the training batch, at which the teacher would run online
        self.cache = settings.teacher_cache or TeacherOutputCache()
        self.seed = seed
        self.autocast_dtype = autocast_dtype
        self.channels_last = channels_last
        self.views: TeacherViews | None = None  # once a teacher reads views, every batch replays them
        self.modes: list[dict[str, Any]] = []

    def serve(self, teacher: nn.Module, taps: list[str], cacheable: bool, soft_labels: bool,
              two_views: bool = False) -> TeacherFn:
        """Looked up in the cache (one pass over the training split per content key); with augmented inputs, read
        from teacher views when the method reads only the teacher's softmax (`soft_labels`, no taps); else computed
        online, on exactly the student's batch. Online also when the method opts out (`cacheable=False`), reads two
        views of each image (`two_views`: the teacher function is then called on each), or the pipeline turns the
        cache off."""
        if two_views:
            return self._online(teacher, taps, "two views per image: the method reads the teacher on a weak and a "
                                               "strong view of each image at every step, drawn anew each time, "
                                               "which neither the teacher cache nor teacher views keep")
        if not cacheable:
            return self._online(teacher, taps, "the method's teacher changes while it trains")
        if self.settings.teacher_online:
            return self._online(teacher, taps, "distill.teacher_cache is off")
        if not self.data.augmented:
            cached = self.cache.get(teacher, self.data, taps, autocast=self.autocast_dtype,
                                    channels_last=self.channels_last)
            self._record("cached", "un-augmented inputs: one teacher pass over the training split",
                         **self._pass_details())
            return lambda batch: cached.select(batch.index)
        if not soft_labels or taps:
            return self._online(teacher, taps, "augmented inputs, and the method reads teacher features or raw "
                                               "logits, which teacher views do not keep")
        return self._views(teacher)

    def _views(self, teacher: nn.Module) -> TeacherFn:
        start = time.perf_counter()
        self.views = views = teacher_views(self.cache, teacher, self.data, views=self.settings.teacher_views,
                                           topk=self.settings.teacher_topk, seed=self.seed,
                                           autocast=self.autocast_dtype, channels_last=self.channels_last)
        self._record("views", "augmented inputs: the teacher's soft labels on recorded views, replayed",
                     views=views.views, topk=views.topk, seconds=time.perf_counter() - start, **self._pass_details(),
                     break_even_epochs=self._break_even_epochs(views.views))
        # log p̂ stands in for the logits: a loss reading softmax(z / T) gets the stored distribution at T.
        return lambda batch: Outputs(views.log_probabilities(batch.index, batch.view))

    def _pass_details(self) -> dict[str, Any]:
        """How the lookup just made reached its entry: found in the cache (the pass costs nothing) or by a teacher
        pass, with its batch, what the probe measured and its cost per row (per view, for views)."""
        done = self.cache.last_pass
        return {"found_in_cache": done is None, "teacher_pass": None if done is None else done.report()}

    def _break_even_epochs(self, views: int) -> float | None:
        """The epochs from which recording `views` views per image costs less than running the teacher online: the
        pass's cost per view × views over the cost per row of its probe chunk nearest the training batch (what an
        online teacher pays per image); None where the pass had no probe (found in the cache, CUDA, streamed)."""
        done = self.cache.last_pass
        if done is None or not done.probed:
            return None
        nearest = min(done.probed, key=lambda b: abs(math.log(b / self.batch_size)))
        return round(views * done.seconds / done.rows / done.probed[nearest], 2)

    def _online(self, teacher: nn.Module, taps: list[str], reason: str) -> TeacherFn:
        self._record("online", reason)
        return lambda batch: teacher_pass(teacher, batch.x, taps, self.autocast_dtype)

    def _record(self, mode: str, reason: str, **details: Any) -> None:
        self.modes.append({"mode": mode, "reason": reason, **details})
