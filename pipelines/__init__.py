"""The example pipelines, installed with kdpipe as kdpipe.pipelines (data only): `kdpipe init` copies digits.yaml."""
