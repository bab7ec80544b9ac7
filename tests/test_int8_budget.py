"""export.int8_budget: static INT8 within an accuracy budget, by keeping the most sensitive nodes in float."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from conftest import FAST, LENIENT, PIPELINES, cli, read_report, sets
from kdpipe.config import ExportConfig, Int8Budget, ValidateConfig
from kdpipe.deploy import calibration_batches, inputs_for, measure_model
from kdpipe.int8_budget import fit_budget
from kdpipe.models.zoo import CNN
from kdpipe.onnx_export import export_onnx
from kdpipe.quantize import quantize

DIGITS = PIPELINES / "digits.yaml"
OUTLIER_SCALE = 1.0e3
BUDGET = 0.01
# Validate's settings with the fewest timed calls kdpipe allows: the candidates' latency is reported, not tested.
QUICK_VALIDATION = ValidateConfig(warmup=1, runs=5, budget_s=0.2)
EXPORT = ExportConfig(quantize="static", deliver="best", int8_budget={"max_accuracy_drop": BUDGET})


def train_briefly(data, epochs: int = 6) -> nn.Module:
    torch.manual_seed(0)
    model = CNN((1, 8, 8), 10, width=8, depth=2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        order = torch.randperm(len(data.x_train))
        for start in range(0, len(order), 64):
            batch = order[start:start + 64]
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


def make_outlier_channel(model: CNN, channel: int = 0, scale: float = OUTLIER_SCALE) -> None:
    """Multiply one channel of the first block's activation by `scale` and divide the second conv's weights that
    read it by `scale`: the same function (ReLU is positively homogeneous), but a per-tensor activation range
    `scale` times wider than the other channels need."""
    conv, bn, relu = model.blocks[0]
    assert isinstance(bn, nn.BatchNorm2d) and isinstance(relu, nn.ReLU)  # the BN's affine output feeds the ReLU
    with torch.no_grad():
        bn.weight[channel] *= scale  # the folded conv's weights and bias for this channel, as exported
        bn.bias[channel] *= scale
        model.blocks[1][0].weight[:, channel] /= scale


@pytest.fixture(scope="module")
def outlier_graph(tmp_path_factory, digits) -> Path:
    """FP32 ONNX of a small CNN trained briefly on digits, one of whose activations is outlier-heavy."""
    model = train_briefly(digits)
    with torch.no_grad():
        before = model(digits.x_val)
        make_outlier_channel(model)
        after = model(digits.x_val)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4), (before - after).abs().max()
    path = tmp_path_factory.mktemp("int8-budget") / "student.onnx"
    export_onnx(model, digits.x_val[:2], path, 18, True)
    return path


def val_accuracy(path: Path, data) -> float:
    return measure_model(path, QUICK_VALIDATION, inputs_for(path, data, "val"), data.y_val.numpy(), [])["accuracy"]


def calibration(data) -> list[np.ndarray]:
    return calibration_batches(data, EXPORT, 64, 0)


def float_weighted_nodes(path: Path) -> set[str]:
    """Conv and Gemm nodes whose weights are float initializers, not the output of a DequantizeLinear."""
    graph = onnx.load(str(path)).graph
    floats = {init.name for init in graph.initializer if init.data_type == onnx.TensorProto.FLOAT}
    return {node.name for node in graph.node if node.op_type in ("Conv", "Gemm") and node.input[1] in floats}


def test_full_static_int8_loses_accuracy_on_an_outlier_activation(outlier_graph, digits, tmp_path):
    int8_path = tmp_path / "student.int8.onnx"
    quantize(outlier_graph, int8_path, "static", calibration(digits))
    fp32, int8 = val_accuracy(outlier_graph, digits), val_accuracy(int8_path, digits)
    assert fp32 > 0.85
    assert fp32 - int8 > BUDGET, (fp32, int8)
    assert float_weighted_nodes(int8_path) == set()  # every Conv and Gemm quantized


def test_the_most_sensitive_nodes_stay_in_float_until_the_budget_is_met(outlier_graph, digits, tmp_path):
    int8_path = tmp_path / "student.int8.onnx"
    x_val, y_val = inputs_for(outlier_graph, digits, "val"), digits.y_val.numpy()
    budget = fit_budget(outlier_graph, int8_path, calibration(digits), EXPORT, x_val, y_val, QUICK_VALIDATION)

    fp32 = val_accuracy(outlier_graph, digits)
    assert budget["fp32_val_accuracy"] == pytest.approx(fp32)
    assert budget["drop_before"] == pytest.approx(fp32 - budget["int8_val_accuracy_full"])
    assert budget["drop_before"] > BUDGET
    assert budget["within_budget"] is True and 1 <= len(budget["excluded_nodes"]) <= 8
    mixed = val_accuracy(int8_path, digits)
    assert fp32 - mixed <= BUDGET and budget["drop_after"] == pytest.approx(fp32 - mixed)
    # Kept in float in sensitivity order, each costing more than the budget when quantized alone.
    ranked = sorted(budget["sensitivity"], key=budget["sensitivity"].get, reverse=True)
    assert budget["excluded_nodes"] == ranked[:len(budget["excluded_nodes"])]
    assert all(budget["sensitivity"][node] > BUDGET for node in budget["excluded_nodes"])
    # One candidate per excluded set tried, after full INT8; the last is the model written.
    candidates = budget["candidates"]
    assert [c["excluded_nodes"] for c in candidates] == [ranked[:n] for n in range(len(candidates))]
    assert candidates[0]["val_accuracy"] == budget["int8_val_accuracy_full"]
    assert candidates[-1]["val_accuracy"] == pytest.approx(fp32 - budget["drop_after"])
    assert all(c["latency_p50_ms"] > 0 for c in candidates) and budget["latency_batch_size"] == 1
    # The excluded nodes' weights stay float; the others are still quantized.
    weighted = {n.name for n in onnx.load(str(outlier_graph)).graph.node if n.op_type in ("Conv", "Gemm")}
    float_weighted = float_weighted_nodes(int8_path)
    assert float_weighted == set(budget["excluded_nodes"]) & weighted and weighted - float_weighted


def test_out_of_nodes_to_exclude_the_build_with_the_most_in_float_is_left(outlier_graph, digits, tmp_path):
    export = EXPORT.model_copy(update={"int8_budget": Int8Budget(max_accuracy_drop=BUDGET, max_excluded_nodes=1)})
    int8_path = tmp_path / "student.int8.onnx"
    x_val, y_val = inputs_for(outlier_graph, digits, "val"), digits.y_val.numpy()
    budget = fit_budget(outlier_graph, int8_path, calibration(digits), export, x_val, y_val, QUICK_VALIDATION)

    assert budget["within_budget"] is False and budget["drop_after"] > BUDGET
    assert len(budget["candidates"]) == 2 and len(budget["excluded_nodes"]) == 1
    assert val_accuracy(int8_path, digits) == pytest.approx(budget["fp32_val_accuracy"] - budget["drop_after"])
    assert float_weighted_nodes(int8_path) <= set(budget["excluded_nodes"]) and float_weighted_nodes(int8_path)


def test_every_node_static_int8_quantizes_is_a_candidate_to_keep_in_float(digits, tmp_path):
    """The pipeline's outlier student has a Mul (its channel gain) that quantize_static quantizes by default though
    it is not in onnxruntime's QDQ registry: with every listed node excluded, nothing is quantized."""
    from fixture_models import outlier_cnn
    from kdpipe.quantize import quantizable_nodes

    fp32 = tmp_path / "outlier.onnx"
    export_onnx(outlier_cnn(digits.input_shape, digits.num_classes).eval(), digits.x_val[:2], fp32, 18, True)
    nodes = quantizable_nodes(fp32)
    assert "Mul" in nodes.values() and {"Conv", "Gemm", "Relu"} <= set(nodes.values())
    int8 = tmp_path / "outlier.int8.onnx"
    quantize(fp32, int8, "static", calibration(digits), nodes_to_exclude=list(nodes))
    assert not {"QuantizeLinear", "DequantizeLinear"} & {n.op_type for n in onnx.load(str(int8)).graph.node}


def test_a_budget_on_dynamic_quantization_is_refused(workdir):
    result = cli("check", DIGITS, *sets("export.quantize=dynamic", "export.int8_budget={max_accuracy_drop: 0.01}"))
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "export.int8_budget" in lines[0], result.output


def test_a_budget_with_quantize_searched_is_refused(workdir):
    """Trials score plain INT8 (a sensitivity search per trial would cost a build per node), so a budget beside a
    searched export.quantize would ship what no trial was scored on."""
    search = PIPELINES / "digits-search.yaml"
    result = cli("check", search, *sets("export.quantize=static", "export.int8_budget={max_accuracy_drop: 0.01}",
                                        "search.space={export.quantize: {choices: [static, qat]}}"))
    assert result.exit_code == 2, result.output
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"{search}: search.space.export.quantize: export.int8_budget keeps nodes in float"), line


def test_the_report_carries_the_budget_only_when_one_is_set(workdir):
    without = cli("run", DIGITS, *sets(*FAST, *LENIENT))
    assert without.exit_code == 0, without.output
    assert "budget" not in read_report(without.stdout)["quantization"]

    result = cli("run", DIGITS, *sets(*FAST, *LENIENT, "export.int8_budget={max_accuracy_drop: 0.01}"))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    quantization, budget = report["quantization"], report["quantization"]["budget"]
    assert budget["budget"] == {"max_accuracy_drop": 0.01, "max_excluded_nodes": 8}
    assert budget["drop_before"] == pytest.approx(budget["fp32_val_accuracy"] - budget["int8_val_accuracy_full"])
    assert budget["within_budget"] == (budget["drop_after"] <= 0.01)
    assert budget["excluded_nodes"] == budget["candidates"][-1]["excluded_nodes"]
    assert (budget["sensitivity"] == {}) == (budget["drop_before"] <= 0.01)
    assert 0.5 < budget["fp32_val_accuracy"] <= 1.0 and budget["candidates"][0]["latency_p50_ms"] > 0
    run = MlflowClient().get_run(report["mlflow"]["run_id"])
    assert run.data.tags["kdpipe.int8_excluded_nodes"] == ",".join(budget["excluded_nodes"])
    assert run.data.metrics["int8_budget/drop_before"] == pytest.approx(budget["drop_before"])
    assert run.data.metrics["int8_budget/drop_after"] == pytest.approx(budget["drop_after"])
    if not budget["within_budget"]:
        assert quantization["delivered"] == "fp32" and "export.int8_budget" in quantization["reason"]


# A pipeline student with one outlier channel (tests/fixture_models.py): full static INT8 collapses it to chance.
OUTLIER_STUDENT = f"student.model={{entrypoint: '{Path(__file__).parent / 'fixture_models.py'}:outlier_cnn'}}"
# Twelve epochs: it trains more slowly than the zoo CNN (its reading convolution has no BatchNorm).
DELIVER_INT8 = [*FAST, "distill.epochs=12", *LENIENT, OUTLIER_STUDENT, "export.quantize=static", "export.deliver=int8"]


def test_a_run_ships_int8_within_the_budget_with_the_outlier_nodes_in_float(workdir):
    result = cli("run", DIGITS, *sets(*DELIVER_INT8, "export.int8_budget={max_accuracy_drop: 0.01}"))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    quantization, budget = report["quantization"], report["quantization"]["budget"]
    assert quantization["delivered"] == "int8" and report["onnx"]["quantization"] == "static"
    assert budget["drop_before"] > 0.5 and budget["within_budget"] is True
    # On the test split, which the budget never saw: within a point of the FP32 graph.
    fp32, int8 = quantization["fp32"]["accuracy"], quantization["int8"]["accuracy"]
    assert fp32 > 0.75 and fp32 - int8 <= 0.01 and report["student"]["accuracy"] == int8
    delivered = Path(report["onnx"]["path"])
    assert delivered.name == "student.int8.onnx"
    weighted = {n.name for n in onnx.load(str(delivered)).graph.node if n.op_type in ("Conv", "Gemm")}
    assert float_weighted_nodes(delivered) == set(budget["excluded_nodes"]) & weighted != set()
    assert weighted - float_weighted_nodes(delivered) or len(budget["excluded_nodes"]) == len(weighted)
    run = MlflowClient().get_run(report["mlflow"]["run_id"])
    assert run.data.tags["kdpipe.int8_excluded_nodes"] == ",".join(budget["excluded_nodes"])


def test_without_a_budget_the_same_student_ships_full_int8_as_before(workdir):
    result = cli("run", DIGITS, *sets(*DELIVER_INT8))
    report = read_report(result.stdout)
    quantization = report["quantization"]
    assert "budget" not in quantization and quantization["delivered"] == "int8"
    assert quantization["fp32"]["accuracy"] - quantization["int8"]["accuracy"] > 0.5
    assert float_weighted_nodes(Path(report["onnx"]["path"])) == set()  # every Conv and Gemm quantized
    assert result.exit_code == 1 and "accuracy_min" in result.output  # the collapsed INT8 fails its gates
