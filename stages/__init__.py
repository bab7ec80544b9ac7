"""The pipeline's stages, in run order (installed as kdpipe.stages). Each is a `kdpipe.results.Stage`: it declares
the results it needs and the frozen result its `run(ctx)` returns; the runner, `--until` and --resume take the
stages and their names from `STAGES`."""

from kdpipe.stages.distill import Distill
from kdpipe.stages.export import Export
from kdpipe.stages.register import Register
from kdpipe.stages.search import Search
from kdpipe.stages.teacher import Teacher
from kdpipe.stages.validate import Validate

STAGES = (Teacher(), Search(), Distill(), Export(), Validate(), Register())
