"""The schema knows nothing of the runtime: the sections import no runtime part, names of installed things are
checked against registries the pipeline passes in, paths are found by their fields' types, and each data
source has a section of its own."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import pytest
from pydantic import Field

from conftest import ROOT, write_pipeline
from kdpipe.config import ModelConfig, ValidateConfig
from kdpipe.config_base import Strict
from kdpipe.config_paths import LocalPath, resolve_paths
from kdpipe.errors import InputError
from kdpipe.pipeline import load_pipeline


def test_the_schema_modules_import_no_runtime_part():
    modules = "kdpipe.config, kdpipe.config_base, kdpipe.config_data, kdpipe.config_errors, kdpipe.config_paths"
    loaded = subprocess.run([sys.executable, "-c", f"import sys, {modules}; print(' '.join(sys.modules))"],
                            capture_output=True, text=True, check=True, cwd=ROOT).stdout.split()
    runtime_parts = ("kdpipe.onnx_runtime", "kdpipe.openvino_runtime", "kdpipe.models", "torch", "onnxruntime", "openvino")
    assert [m for m in loaded if m.startswith(runtime_parts)] == []


def test_names_are_checked_against_the_registries_in_the_validation_context():
    # Built in code without registries: the part that uses the name checks it (models.build_model, onnxruntime).
    assert ModelConfig(arch="no_such_arch").arch == "no_such_arch"
    context = {"architectures": {"cnn": None}, "model_libraries": ["timm:"], "providers": ["CPUExecutionProvider"]}
    with pytest.raises(ValueError, match="unknown arch 'cnx' \\(did you mean 'cnn'\\?\\); expected one of cnn"):
        ModelConfig.model_validate({"arch": "cnx"}, context=context)
    with pytest.raises(ValueError, match="unknown execution provider 'CPUExecutionProvidr'"):
        ValidateConfig.model_validate({"providers": ["CPUExecutionProvidr"]}, context=context)


class Section(Strict):
    """A section kdpipe.pipeline never heard of, holding paths where no fixed list of locations would look."""

    models: list[ModelConfig] = Field(default_factory=list)
    table: Annotated[Path | None, LocalPath("lookup table")] = None


def test_paths_are_found_by_field_type_wherever_the_section_sits(tmp_path):
    (tmp_path / "w.pt").write_bytes(b"")
    (tmp_path / "t.csv").write_text("")
    raw = {"models": [{"arch": "cnn"}, {"arch": "cnn", "weights": "w.pt"}], "table": "t.csv", "other": "t.csv"}
    resolved = resolve_paths(Section, raw, ("distill", "params"), lambda loc: (tmp_path, "the test's folder"))
    assert resolved == {"models": [{"arch": "cnn"}, {"arch": "cnn", "weights": str(tmp_path / "w.pt")}],
                        "table": str(tmp_path / "t.csv"), "other": "t.csv"}
    with pytest.raises(InputError) as err:
        resolve_paths(Section, {"table": "gone.csv"}, ("distill", "params"), lambda loc: (tmp_path, "the test's folder"))
    assert (err.value.key, err.value.message) == (
        "distill.params.table", f"lookup table not found: gone.csv (resolved against {tmp_path}, the test's folder)")


@pytest.mark.parametrize("data, key, fragments", [
    ({"source": "npzz", "path": "d.npz"}, "data.source",
     ["unknown source 'npzz' (did you mean 'npz'?); expected one of cifar, csv, digits, hf, imagefolder, npz"]),
    ({"source": "digits", "path": "d.npz"}, "data.path",
     ["path applies to source cifar, csv, hf, imagefolder, npz, not to source 'digits'; valid keys here: source, "
      "num_classes"]),
    ({"source": "npz", "path": "d.npz", "image_size": 8}, "data.image_size",
     ["image_size applies to source hf, imagefolder, not to source 'npz'; valid keys here: ", "shape, layout, path"]),
    ({"source": "csv", "path": "d.npz", "lable_column": "x"}, "data.lable_column",
     ["unknown key (did you mean 'label_column'?); valid keys here: ", "label_column, split_column"]),
    ({"source": "npz"}, "data.path", ["required key is missing"]),
    ({"source": "hf", "path": "d.npz", "augment": ["vflip"]}, "data.augment.0.vflip",
     ["unknown key (did you mean 'hflip'?)"]),
])
def test_each_source_takes_its_own_keys(tmp_path, data, key, fragments):
    (tmp_path / "d.npz").write_bytes(b"")
    path = write_pipeline(tmp_path / "p.yaml", data=data)
    with pytest.raises(InputError) as err:
        load_pipeline(path)
    assert err.value.key == key, err.value.message
    assert all(fragment in err.value.message for fragment in fragments), err.value.message


def test_a_source_without_its_tag_is_digits_and_keeps_its_keys_when_recorded(tmp_path):
    pipeline = load_pipeline(write_pipeline(tmp_path / "p.yaml", data={"batch_size": 32, "augment": ["hflip"]}))
    assert pipeline.data.source == "digits" and pipeline.data.batch_size == 32
    assert pipeline.resolved()["data"]["augment"] == [{"hflip": {"p": 0.5}}]
    assert "image_size" not in pipeline.resolved()["data"]
