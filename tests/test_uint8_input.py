"""`export.input: uint8`: the ONNX graphs take decoded 8-bit images and hold the scaling and normalization.

End to end through `kdpipe run` on an image folder, then checked against the float path with onnxruntime on
the test split; and the refusals (exit 2, one line naming export.input) for data that is not 8-bit images.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import FAST, cli, read_report, sets, write_pipeline
from kdpipe.config import ModelConfig
from kdpipe.data.sources import data_config
from kdpipe.data import load_data
from kdpipe.models import build_model
from kdpipe.models.adapter import graph_inputs
from kdpipe.onnx_export import export_onnx, takes_uint8
from kdpipe.onnx_runtime import predict, session
from test_images import image_data, image_pipeline  # noqa: F401 - the session's image folders, a fixture

MEAN, STD = [0.3, 0.35, 0.4], [0.3, 0.32, 0.35]  # per channel, different, so a channel mix-up shows


def test_8bit_val_and_test_are_held_as_uint8_and_a_uint8_graph_gets_the_stored_bytes(image_data):  # noqa: F811
    """Val/test of 8-bit images are stored as the decoded uint8 images (read here without normalization) and
    converted when read; a uint8 graph is fed those stored bytes themselves, a float graph the converted inputs."""
    common = dict(source="imagefolder", path=image_data["splits"], channels=3)
    normalized = load_data(data_config(**common, normalize={"mean": MEAN, "std": STD}), seed=0)
    plain = load_data(data_config(**common), seed=0)
    assert normalized.stored_val.dtype == normalized.stored_test.dtype == torch.uint8
    assert torch.equal(normalized.stored_test, (plain.x_test * 255).round().to(torch.uint8))
    assert graph_inputs(normalized, "test", "uint8") is normalized.stored_test
    assert graph_inputs(normalized, "val", "uint8") is normalized.stored_val
    floats = graph_inputs(normalized, "test", "float")
    assert floats.dtype == torch.float32 and torch.equal(floats, normalized.x_test)
    assert torch.equal(floats, normalized.conversion(normalized.stored_test))


@pytest.mark.slow
def test_uint8_graph_predicts_what_the_float_graph_does_end_to_end(workdir, image_data):  # noqa: F811
    import shutil

    shutil.copytree(image_data["splits"], workdir / "pets")
    path = image_pipeline(workdir / "p.yaml", path="pets", channels=3, normalize={"mean": MEAN, "std": STD})
    # About the graphs' input, not accuracy: the 3-epoch student is just above chance (~0.47 on 4 classes), so the
    # chance gate is named off with the accuracy gates.
    result = cli("run", path, *sets(*FAST, "teacher.train.epochs=3", "distill.epochs=3", "export.input=uint8",
                                    "export.quantize=qat", "export.qat_epochs=1", "export.deliver=fp32", "validate.gates.accuracy_min=0.0",
                                    "validate.gates.max_accuracy_drop_vs_teacher=1.0",
                                    "validate.gates.latency_p50_ms_max=1000", "validate.gates.above_chance=null"))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    run_dir = Path(report["run_dir"])
    student_onnx, teacher_onnx = run_dir / "student.onnx", run_dir / "teacher.onnx"
    int8_onnx, qat_onnx = Path(report["quantization"]["int8"]["path"]), Path(report["quantization"]["qat"]["path"])

    # Every graph of the run takes uint8 N×C×H×W, INT8 included (static quantization keeps the input and its Cast;
    # the QAT graph is exported with the same adapter in front of it).
    for graph in (student_onnx, teacher_onnx, int8_onnx, qat_onnx):
        inp = session(graph).get_inputs()[0]
        assert (inp.type, inp.shape[1:]) == ("tensor(uint8)", [3, 16, 16]), graph
    assert report["quantization"]["built"] and report["quantization"]["calibration_samples"] > 0
    props = {p.key: p.value for p in onnx.load(str(student_onnx)).metadata_props}
    assert props["kdpipe.input_dtype"] == "uint8" and props["kdpipe.input_shape"] == "N×3×16×16"
    assert json.loads(props["kdpipe.normalize_mean"]) == MEAN and json.loads(props["kdpipe.normalize_std"]) == STD
    assert report["onnx"]["input"] == props["kdpipe.input"] and report["onnx"]["input"].startswith("uint8 N×3×16×16")
    for graph, quantization in ((student_onnx, "none"), (int8_onnx, "static"), (qat_onnx, "qat")):
        graph_props = {p.key: p.value for p in onnx.load(str(graph)).metadata_props}
        assert graph_props["kdpipe.input"] == props["kdpipe.input"] and graph_props["kdpipe.quantization"] == quantization
    assert report["quantization"]["qat"]["parity"]["agreement"] >= 0.99

    # The same student exported the float way: both graphs in onnxruntime, on the test split.
    data = load_data(data_config(source="imagefolder", path=workdir / "pets", channels=3,
                                normalize={"mean": MEAN, "std": STD}), seed=0)
    plain = load_data(data_config(source="imagefolder", path=workdir / "pets", channels=3), seed=0)
    images = (plain.x_test * 255).round().to(torch.uint8).numpy()  # decoded images, no conversion applied
    student = build_model(ModelConfig(arch="cnn", width=8, depth=2), "student.model", data.input_shape, data.num_classes)
    student.load_state_dict(torch.load(run_dir / "student.pt", weights_only=True)["student"])
    export_onnx(student.eval(), data.x_val[:2], workdir / "float.onnx", 18, True)
    assert not takes_uint8(workdir / "float.onnx") and takes_uint8(student_onnx)
    float_logits = predict(session(workdir / "float.onnx"), data.x_test.numpy())
    uint8_logits = predict(session(student_onnx), images)
    assert np.array_equal(float_logits.argmax(1), uint8_logits.argmax(1))
    assert np.abs(float_logits - uint8_logits).max() < 1e-4
    # validate measured the uint8 graph on the uint8 images: its accuracy is the float graph's.
    float_accuracy = float((float_logits.argmax(1) == data.y_test.numpy()).mean())
    assert report["student"]["accuracy"] == pytest.approx(float_accuracy)

    # `kdpipe validate` takes the uint8 graph as it is and feeds it, and the teacher's graph, the 8-bit images.
    validated = cli("validate", student_onnx, "--pipeline", path, *sets(*FAST, "teacher.train.epochs=3",
                                                                       "validate.gates={}"))
    assert validated.exit_code == 0, validated.output
    again = read_report(validated.stdout)
    assert again["student"]["accuracy"] == report["student"]["accuracy"]
    assert session(Path(again["teacher"]["onnx"]["path"])).get_inputs()[0].type == "tensor(uint8)"

    # The registered model's signature says uint8, and so does the version's tag.
    import mlflow

    info = mlflow.models.get_model_info(report["mlflow"]["model_uri"])
    assert [str(s.type) for s in info.signature.inputs.inputs] == ["uint8"]
    version = mlflow.MlflowClient().get_model_version("digits-student", report["mlflow"]["model_version"])
    assert version.tags["kdpipe.input"] == report["onnx"]["input"]


def test_float_data_refuses_a_uint8_graph(workdir):
    """digits (floats 0..16), csv and a float32 npz of images: exit 2, one line naming export.input."""
    rng = np.random.default_rng(0)
    x = rng.random((60, 3, 8, 8), dtype=np.float32)
    np.savez(workdir / "float-images.npz", x=x, y=np.arange(60) % 3)
    np.savetxt(workdir / "rows.csv", np.column_stack([rng.random((60, 4)), np.arange(60) % 3]), delimiter=",",
               header="a,b,c,d,label", comments="")
    for name, data in (("digits", None), ("npz", {"source": "npz", "path": "float-images.npz"}),
                       ("csv", {"source": "csv", "path": "rows.csv"})):
        path = write_pipeline(workdir / f"{name}.yaml", **({"data": data} if data else {}), **{"export.input": "uint8"})
        result = cli("check", path)
        assert result.exit_code == 2, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{path}: export.input: uint8 needs 8-bit images"), lines
        assert "float samples" in lines[0] and "use input: float" in lines[0]


def test_validate_refuses_a_uint8_graph_for_data_that_is_not_8bit_images(workdir):
    from torch import nn

    from kdpipe.models.adapter import InputAdapter

    classifier = InputAdapter(nn.Sequential(nn.Flatten(), nn.Linear(64, 10))).eval()
    export_onnx(classifier, torch.zeros((2, 1, 8, 8), dtype=torch.uint8), workdir / "u8.onnx", 18, True)
    path = write_pipeline(workdir / "p.yaml")
    result = cli("validate", workdir / "u8.onnx", "--pipeline", path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MODEL: expected a float32 input, the model's 'input' is tensor(uint8) (uint8 takes " \
                                "8-bit images, and the data hold none)" in lines[0], lines
    assert not (workdir / "runs").exists()


def test_uint8_npz_images_in_nhwc_take_a_uint8_graph(workdir):
    rng = np.random.default_rng(0)
    np.savez(workdir / "images.npz", x=rng.integers(0, 256, (60, 8, 8, 3), dtype=np.uint8), y=np.arange(60) % 3)
    path = write_pipeline(workdir / "p.yaml", data={"source": "npz", "path": "images.npz"}, **{"export.input": "uint8"})
    result = cli("check", path)
    assert result.exit_code == 0, result.output
