"""Models by library name (timm:, torchvision:, hf:), weights files, reset_head, entry points, default taps,
every bad input of those, and the uint8 ONNX input adapter. Real libraries, nothing downloaded: models are built
with random weights and saved locally, then loaded by the pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from conftest import FAST, cli, read_report, sets, write_pipeline
from kdpipe.config import ModelConfig
from kdpipe.config_errors import submodel, union_members
from kdpipe.data.sources import data_config
from kdpipe.pipeline import Pipeline
from kdpipe.errors import InputError
from kdpipe.models import build_model
from kdpipe.models.adapter import InputAdapter

timm = pytest.importorskip("timm")  # the vision extra; scripts/test.sh installs it, so CI runs all of these
torchvision = pytest.importorskip("torchvision")
transformers = pytest.importorskip("transformers")

DIGITS = (1, 8, 8)
# The teachers are untrained models given as weights (the runs are about the export path): the chance gate is off.
LENIENT_RUN = [*FAST, "teacher.train.epochs=0", "distill.epochs=2", "validate.gates.accuracy_min=0.0",
               "validate.gates.max_accuracy_drop_vs_teacher=1.0", "validate.gates.latency_p50_ms_max=1000",
               "validate.gates.above_chance=null", "export.quantize=none", "export.deliver=fp32"]


def build(arch: str | None = None, key: str = "teacher.model", shape=DIGITS, classes: int = 10, **fields) -> nn.Module:
    cfg = ModelConfig(arch=arch, **fields) if arch else ModelConfig(**fields)
    return build_model(cfg, key, shape, classes)


def same_outputs(a: nn.Module, b: nn.Module, shape=DIGITS) -> bool:
    x = torch.randn(4, *shape)
    with torch.no_grad():
        return torch.equal(a.eval()(x), b.eval()(x))


def save_hf_vit(path, classes: int = 10):
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=32, num_labels=classes)
    transformers.ViTForImageClassification(config).save_pretrained(path)
    return path


# --- building by name, weights ------------------------------------------------------------------


def test_timm_model_with_safetensors_weights_and_feature_info_taps(tmp_path):
    source = build("timm:test_resnet")
    save_file(source.state_dict(), tmp_path / "w.safetensors")
    loaded = build("timm:test_resnet", weights=tmp_path / "w.safetensors")
    assert same_outputs(source, loaded)
    assert loaded.default_taps == ["act1", "layer1", "layer2", "layer3", "layer4"]  # timm's feature_info
    assert loaded.embedding_tap == "global_pool"


def test_torchvision_model_with_wrapped_checkpoint_and_module_prefix(tmp_path):
    source = build("torchvision:resnet18", shape=(3, 32, 32))
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, tmp_path / "w.pt")
    loaded = build("torchvision:resnet18", shape=(3, 32, 32), weights=tmp_path / "w.pt")
    assert same_outputs(source, loaded, (3, 32, 32))
    assert loaded.default_taps == ["layer1", "layer2", "layer3", "layer4"]
    assert loaded.embedding_tap == "avgpool"


def test_torchvision_family_without_named_stages_gets_taps_from_the_dry_pass():
    model = build("torchvision:mobilenet_v2", shape=(3, 64, 64))
    assert model.default_taps == ["features.1", "features.3", "features.6", "features.13", "features.18"]
    assert model.embedding_tap == "classifier.0"


def test_reset_head_keeps_the_body_and_replaces_the_classifier(tmp_path):
    source = build("timm:test_resnet", classes=1000)
    torch.save({"model": source.state_dict()}, tmp_path / "w.pt")
    with pytest.raises(InputError) as err:
        build("timm:test_resnet", weights=tmp_path / "w.pt")
    assert err.value.key == "teacher.model.weights"
    assert "first fc.weight: file (1000, 96) vs model (10, 96)" in err.value.message
    assert "set reset_head: true" in err.value.message
    loaded = build("timm:test_resnet", weights=tmp_path / "w.pt", reset_head=True)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in body.items())
    assert loaded.fc.out_features == 10


def test_hf_directory_returns_logits_and_taps_its_layers(tmp_path):
    model = build(f"hf:{save_hf_vit(tmp_path / 'vit')}")
    with torch.no_grad():
        assert model(torch.zeros(3, *DIGITS)).shape == (3, 10)
    # One tap per encoder layer (their module path differs between transformers versions), each giving the
    # layer's hidden states: 4 patches + the class token, 16 wide.
    assert len(model.default_taps) == 2 and all(t.startswith("model.vit.") for t in model.default_taps)
    from kdpipe.taps import forward_with_taps

    with torch.no_grad():
        features = forward_with_taps(model.eval(), torch.randn(3, *DIGITS), model.default_taps).features
    assert [tuple(f.shape) for f in features.values()] == [(3, 5, 16), (3, 5, 16)]
    assert not torch.equal(*features.values())
    # ViT reads the class token (a slice, not a module output): no embedding tap to offer.
    assert model.embedding_tap is None


def test_hf_with_other_class_count_needs_reset_head(tmp_path):
    directory = save_hf_vit(tmp_path / "vit", classes=5)
    with pytest.raises(InputError) as err:
        build(f"hf:{directory}")
    assert err.value.key == "teacher.model.reset_head"
    assert "classifies 5 classes but the data has 10" in err.value.message
    assert build(f"hf:{directory}", reset_head=True).model.classifier.out_features == 10


def test_entrypoint_returning_a_transformers_model_is_wrapped_to_logits(tmp_path, monkeypatch):
    (tmp_path / "user_hf.py").write_text(
        "import transformers\n"
        "def vit(num_classes):\n"
        "    c = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,\n"
        "                               num_attention_heads=2, intermediate_size=32, num_labels=num_classes)\n"
        "    return transformers.ViTForImageClassification(c)\n")
    model = build(entrypoint=f"{tmp_path}/user_hf.py:vit")
    with torch.no_grad():
        assert model(torch.zeros(2, *DIGITS)).shape == (2, 10)


def test_entrypoint_factories_with_fewer_arguments(tmp_path):
    (tmp_path / "user_models.py").write_text(
        "from torch import nn\n"
        "def by_classes(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n"
        "def fixed():\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, 10))\n")
    for factory in ("by_classes", "fixed"):
        assert build(entrypoint=f"{tmp_path}:user_models:{factory}")(torch.zeros(2, *DIGITS)).shape == (2, 10)


def test_modules_of_one_name_in_two_folders_are_each_read_from_their_own(tmp_path):
    """Two pipelines in one process (a notebook, the test suite) whose folders each hold a user_models.py: the
    second is not handed the first one's module from Python's import cache."""
    for name, width in (("a", 8), ("b", 16)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "same_name_models.py").write_text(
            "from torch import nn\n"
            f"def net(num_classes):\n    return nn.Sequential(nn.Flatten(), nn.Linear(64, {width}), nn.Linear({width}, num_classes))\n")
    built = [build(entrypoint=f"{tmp_path / name}:same_name_models:net") for name in "ab"]
    assert [model[1].out_features for model in built] == [8, 16]


# --- end to end ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_timm_teacher_with_local_weights_runs_through_onnx(workdir):
    save_file(build("timm:test_resnet").state_dict(), workdir / "teacher.safetensors")
    path = write_pipeline(workdir / "p.yaml", **{"teacher.model": {"arch": "timm:test_resnet",
                                                                    "weights": "teacher.safetensors"}})
    result = cli("run", path, *sets(*LENIENT_RUN))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["status"] == "passed"
    assert report["teacher"]["params"] == sum(p.numel() for p in build("timm:test_resnet").parameters())
    assert report["teacher"]["onnx"]["parity_max_abs_diff"] < 1e-3


@pytest.mark.slow
def test_hf_teacher_and_student_run_through_onnx(workdir):
    save_hf_vit(workdir / "vit")
    path = write_pipeline(workdir / "p.yaml", **{"teacher.model": {"arch": "hf:vit"},
                                                  "student.model": {"arch": "hf:vit"}})
    result = cli("run", path, *sets(*LENIENT_RUN))
    assert result.exit_code == 0, result.output
    report = read_report(result.stdout)
    assert report["status"] == "passed"
    assert report["onnx"]["parity_max_abs_diff"] < 1e-3


# --- bad inputs: exit 2, one line, the key as the user writes it ---------------------------------


def check_line(workdir, key: str, *fragments: str, **changes):
    path = write_pipeline(workdir / "p.yaml", **changes)
    result = cli("check", path)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    assert lines[0].startswith(f"{path}: {key}: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_unknown_timm_name_lists_close_matches(workdir):
    check_line(workdir, "teacher.model.arch", "timm has no model 'resnet10x'", "close matches:", "resnet10t",
               **{"teacher.model": {"arch": "timm:resnet10x"}})


def test_unknown_torchvision_name_lists_close_matches(workdir):
    check_line(workdir, "student.model.arch", "torchvision has no model 'resnet19'", "resnet18",
               **{"student.model": {"arch": "torchvision:resnet19"}})


def test_unknown_library_prefix(workdir):
    check_line(workdir, "student.model.arch", "unknown model library 'tim:'", "did you mean 'timm:'",
               **{"student.model": {"arch": "tim:resnet18"}})


def test_weights_that_do_not_fit_name_the_first_key(workdir):
    torch.save(build("timm:test_resnet").state_dict(), workdir / "w.pt")
    check_line(workdir, "teacher.model.weights", "does not fit the model", "first ",
               **{"teacher.model": {"arch": "cnn", "width": 8, "depth": 2, "weights": "w.pt"}})


def test_entrypoint_that_cannot_be_imported_names_the_key_once(workdir):
    check_line(workdir, "teacher.model.entrypoint", "cannot import 'no_such_module'", "ModuleNotFoundError",
               **{"teacher.model": {"entrypoint": "no_such_module:build"}})


def test_width_on_a_fixed_architecture(workdir):
    check_line(workdir, "student.model.width", "'resnet8' has a fixed size",
               **{"student.model": {"arch": "resnet8", "width": 8}})


def test_hf_directory_without_config(workdir):
    (workdir / "empty").mkdir()
    check_line(workdir, "teacher.model.arch", "not a save_pretrained directory", **{"teacher.model": {"arch": "hf:empty"}})


def _in_schema(key: str, model=Pipeline) -> bool:
    """Whether `key` is a dotted path a user can write in --set: each part a field (by alias) of the pipeline
    models (the distill section: of any method's); below a free mapping (model.kwargs) any key is the factory's."""
    part, _, rest = key.partition(".")
    if part.isdigit():  # an item of a list of sections (distill.params.peers.0)
        part, _, rest = rest.partition(".")
    field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
    if field is None:
        return False
    members = union_members(field.annotation) or [submodel(field.annotation)]
    if not rest or members == [None]:
        return True
    return any(_in_schema(rest, member) for member in members)


def _bad_model_configs(tmp_path):
    torch.save(build("timm:test_resnet").state_dict(), tmp_path / "w.pt")
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "pickled.pt")
    (tmp_path / "empty").mkdir(exist_ok=True)
    return [
        dict(arch="timm:nope"), dict(arch="torchvision:nope"), dict(arch="hf:" + str(tmp_path / "empty")),
        dict(arch="resnet", depth=9), dict(arch="cnn", kwargs={"colour": 1}), dict(arch="resnet8", depth=3),
        dict(arch="cnn", weights=tmp_path / "w.pt"), dict(arch="cnn", weights=tmp_path / "pickled.pt"),
        dict(arch="cnn", weights=tmp_path / "missing.pt"), dict(entrypoint="no_such_module:f"),
        dict(entrypoint="fixture_models:not_a_module"), dict(entrypoint="fixture_models:ten_class_mlp"),
        dict(entrypoint="fixture_models:missing_factory"), dict(arch="mlp", width=4, depth=1, kwargs={"x": 1}),
    ]


def test_every_model_and_data_error_key_is_a_schema_path(tmp_path):
    keys = []
    for section in ("teacher.model", "student.model"):
        for fields in _bad_model_configs(tmp_path):
            with pytest.raises(InputError) as err:
                build_model(ModelConfig(**fields), section, DIGITS, 3)
            keys.append(err.value.key)
    with pytest.raises(InputError) as err:
        build_model(ModelConfig(arch="cnn", weights=tmp_path / "w.pt"), "distill.params.peers.0", DIGITS, 10)
    keys.append(err.value.key)
    from kdpipe.data import load_data

    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8)))
    np.savez(tmp_path / "float_labels.npz", x=np.zeros((40, 8, 8)), y=np.linspace(0, 1, 40))
    (tmp_path / "d.csv").write_text("a,b\n1,2\n")
    for data in (dict(source="npz", path=tmp_path / "missing.npz"), dict(source="npz", path=tmp_path / "bad.npz"),
                 dict(source="npz", path=tmp_path / "float_labels.npz"), dict(source="csv", path=tmp_path / "d.csv"),
                 dict(source="digits", shape=[3, 3]), dict(source="digits", num_classes=4)):
        with pytest.raises(InputError) as err:
            load_data(data_config(**data), 0)
        keys.append(err.value.key)
    assert len(keys) == 2 * len(_bad_model_configs(tmp_path)) + 1 + 6
    not_in_schema = [k for k in keys if not _in_schema(k)]
    assert not_in_schema == []
    assert "teacher.model.entrypoint" in keys and not any(".model.teacher" in k or ".model.student" in k for k in keys)


# --- uint8 ONNX input ----------------------------------------------------------------------------


def test_uint8_adapter_predicts_what_the_float_path_does_through_onnxruntime(tmp_path):
    from kdpipe.onnx_runtime import session
    from kdpipe.onnx_export import export_onnx

    torch.manual_seed(0)
    model = build("resnet8", shape=(3, 16, 16)).eval()
    mean, std = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    floats = (images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    export_onnx(model, floats[:2], tmp_path / "float.onnx", 18, True)
    export_onnx(InputAdapter(model, mean, std).eval(), images[:2], tmp_path / "uint8.onnx", 18, True)
    float_session, uint8_session = session(tmp_path / "float.onnx"), session(tmp_path / "uint8.onnx")
    assert uint8_session.get_inputs()[0].type == "tensor(uint8)"
    float_logits = float_session.run(None, {"input": floats.numpy()})[0]
    uint8_logits = uint8_session.run(None, {"input": images.numpy()})[0]
    assert np.abs(float_logits - uint8_logits).max() < 1e-4
    assert (float_logits.argmax(1) == uint8_logits.argmax(1)).all()


def test_literal_error_keys_in_model_and_data_code_are_schema_paths():
    """Every InputError raised with a literal key in kdpipe/models, kdpipe/data and the teacher stage names a
    schema path (zoo models name theirs relative to their model section: "model.depth")."""
    import ast

    from conftest import ROOT

    files = [*(ROOT / "kdpipe" / "models").glob("*.py"), *(ROOT / "kdpipe" / "data").glob("*.py"),
             ROOT / "stages" / "teacher.py"]
    keys = set()
    for file in files:
        for node in ast.walk(ast.parse(file.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "InputError" and node.args
                    and isinstance(node.args[0], ast.Constant) and node.args[0].value):
                keys.add(node.args[0].value)
    assert {"data.path", "model.arch", "model.depth"} <= keys
    assert [k for k in keys if not _in_schema(k.replace("model.", "teacher.model.", 1) if k.startswith("model.") else k)] == []


def test_a_resolved_pipeline_with_every_key_spelled_out_builds_fixed_architectures():
    """A run directory's pipeline.yaml (read again by --resume) holds width and depth at their defaults."""
    spelled_out = ModelConfig(arch="resnet8").model_dump(mode="json")
    assert build(**spelled_out, shape=(3, 8, 8)).fc.out_features == 10
