"""Every TensorRT name the project calls exists in TensorRT 11's real Python bindings.

Runtime names are checked on the lean runtime bindings, which import without a GPU.
Builder-side classes the lean runtime lacks (Builder, OnnxParser, ParserError,
INetworkDefinition, IBuilderConfig) are checked member by member against their class in
tensorrt_builder_api.json (extracted from the tensorrt-stubs package, which is generated from
TensorRT 10.13's bindings; the package itself cannot be installed without TensorRT's CUDA
libraries), with parameter names and counts, and each name must also be a whole string in
TensorRT 11's full bindings' compiled module (it cannot be imported without TensorRT's
libraries, but its identifiers are in the file), which catches what 11 removed. A renamed,
removed or misplaced API therefore fails here, on a machine without TensorRT.
"""

from __future__ import annotations

import ast
import importlib.util
import inspect
import json
import re
from functools import cache
from pathlib import Path

import pytest

from tests import fake_tensorrt

lean = pytest.importorskip("tensorrt_lean", reason="the dev extra installs tensorrt-lean-cu13")
ROOT = Path(__file__).resolve().parents[2]
TENSORRT_MODULES = [
    "engine/backends/tensorrt/runtime.py",
    "engine/backends/tensorrt/engine.py",
    "engine/backends/tensorrt/refit.py",
    "engine/backends/tensorrt/loading.py",
    "export/tensorrt.py",
    "export/stages.py",
]
IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{2,}")
BUILDER_API: dict[str, dict] = json.loads((Path(__file__).with_name("tensorrt_builder_api.json")).read_text())[
    "classes"
]
REMOVED_IN_TENSORRT_11 = [
    ("BuilderFlag", "FP16"),
    ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS"),
    ("Builder", "build_engine"),
    ("IExecutionContext", "execute_async_v2"),
    ("ICudaEngine", "num_bindings"),
    ("ICudaEngine", "get_binding_shape"),
    ("ICudaEngine", "device_memory_size"),
    ("IBuilderConfig", "max_workspace_size"),
    ("BuilderFlag", "INT8"),  # quantized graphs carry their Q/DQ ops: no precision flag builds them
    ("BuilderFlag", "FP8"),
    ("BuilderFlag", "FP4"),
    ("IBuilderConfig", "int8_calibrator"),
]


@cache
def full_binding_identifiers() -> frozenset[str]:
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the dev extra installs tensorrt-cu13-bindings (TensorRT 11's full bindings)")
    module = next(Path(spec.submodule_search_locations[0]).glob("tensorrt*.so"))
    # Whole C strings only: a name inside a docstring ("BuilderFlag.FP16") is no binding.
    strings = module.read_bytes().split(b"\0")
    return frozenset(s.decode() for s in strings if IDENTIFIER.fullmatch(s))


def in_full_bindings(name: str) -> bool:
    """The linker merges a string into a longer one that ends with it ('num_errors' in 'get_num_errors')."""
    return any(identifier.endswith(name) for identifier in full_binding_identifiers())


def exists(class_name: str, attribute: str) -> bool:
    """On the lean runtime's class where it has one; else a member of that class in the stubs that TensorRT
    11's full bindings still name."""
    real_class = getattr(lean, class_name, None)
    if real_class is not None:
        return hasattr(real_class, attribute)
    members = BUILDER_API.get(class_name, {})
    return attribute in members and in_full_bindings(class_name) and in_full_bindings(attribute)


def signature_matches(class_name: str, method: str, parameters: list[str]) -> bool:
    """The parameters a fake's method takes (after self) are, by name and in order, what one of the
    real method's overloads takes, and at least as many as it requires."""
    overloads = BUILDER_API[class_name][method]
    return any(names[: len(parameters)] == parameters and len(parameters) >= required for names, required in overloads)


def public_api(fake: type) -> list[str]:
    return [
        name
        for name, value in vars(fake).items()
        if not name.startswith("_") and (callable(value) or isinstance(value, property))
    ]


@pytest.mark.parametrize("fake", fake_tensorrt.FAKE_CLASSES, ids=lambda fake: fake.__name__)
def test_fakes_define_only_what_tensorrt_has(fake):
    assert getattr(lean, fake.__name__, None) is not None or in_full_bindings(fake.__name__)
    missing = [name for name in public_api(fake) if not exists(fake.__name__, name)]
    assert not missing, f"{fake.__name__} has no {missing} in TensorRT 11"


def full_tensorrt():
    """The full bindings where their libraries load (a GPU host with the gpu extra); None here."""
    try:
        import tensorrt
    except ImportError:
        return None
    return tensorrt if hasattr(tensorrt, "Builder") else None


@pytest.mark.skipif(full_tensorrt() is None, reason="needs TensorRT's full libraries (pip install '.[gpu]')")
@pytest.mark.parametrize("fake", fake_tensorrt.FAKE_CLASSES, ids=lambda fake: fake.__name__)
def test_fakes_match_each_class_member_exactly_on_the_full_bindings(fake):
    """Where the full bindings import, every Class.member is checked on the class itself, not as
    a string anywhere in the library (the check above is all a machine without TensorRT's libraries allows)."""
    real_class = getattr(full_tensorrt(), fake.__name__)
    missing = [name for name in public_api(fake) if not hasattr(real_class, name)]
    assert not missing, f"{fake.__name__} has no {missing}"


def tensorrt_chains(path: Path) -> set[tuple[str, ...]]:
    """Attribute chains rooted at the TensorRT module: ``trt.X.Y`` and ``self.trt.X.Y``."""
    chains = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Attribute):
            continue
        parts, base = [], node
        while isinstance(base, ast.Attribute):
            parts.append(base.attr)
            base = base.value
        parts.reverse()
        if isinstance(base, ast.Name) and base.id == "trt":
            chains.add(tuple(parts))
        elif isinstance(base, ast.Name) and base.id == "self" and parts[:1] == ["trt"] and len(parts) > 1:
            chains.add(tuple(parts[1:]))
    return {chain for chain in chains if not any(other[: len(chain)] == chain and other != chain for other in chains)}


def resolves(chain: tuple[str, ...]) -> bool:
    """``trt.X`` or ``trt.X.Y``: on the lean runtime where it has X, else X's members in the stubs."""
    if hasattr(lean, chain[0]):
        target = lean
        for part in chain:
            if not hasattr(target, part):
                return False
            target = getattr(target, part)
        return True
    if chain[0] not in BUILDER_API or not in_full_bindings(chain[0]):
        return False
    return len(chain) == 1 or (len(chain) == 2 and exists(*chain))


@pytest.mark.parametrize("module", TENSORRT_MODULES)
def test_module_level_names_exist(module):
    chains = tensorrt_chains(ROOT / module)
    assert chains or module == "export/stages.py"
    missing = [".".join(chain) for chain in chains if not resolves(chain)]
    assert not missing, f"{module} uses {missing}, which TensorRT 11 does not have"


@pytest.mark.parametrize(("class_name", "attribute"), REMOVED_IN_TENSORRT_11)
def test_the_check_rejects_apis_tensorrt_11_removed(class_name, attribute):
    assert not exists(class_name, attribute)
    assert not resolves((class_name, attribute))


@pytest.mark.parametrize(
    ("class_name", "attribute"),
    [("Builder", "parse_from_file"), ("OnnxParser", "build_serialized_network"), ("IBuilderConfig", "set_shape")],
)
def test_the_check_rejects_a_real_name_on_the_wrong_class(class_name, attribute):
    """Each name exists in TensorRT, on another class: a check by identifier alone would pass them."""
    assert in_full_bindings(attribute)
    assert not exists(class_name, attribute)
    assert not resolves((class_name, attribute))


@pytest.mark.parametrize(
    "fake", [f for f in fake_tensorrt.FAKE_CLASSES if f.__name__ in BUILDER_API], ids=lambda f: f.__name__
)
def test_builder_side_fakes_take_the_parameters_tensorrt_takes(fake):
    """Code that calls a fake with the right arguments calls TensorRT with them."""
    constructor = ["__init__"] if "__init__" in BUILDER_API[fake.__name__] else []  # else TensorRT makes them
    methods = [name for name in [*public_api(fake), *constructor] if inspect.isfunction(vars(fake).get(name))]
    wrong = [
        f"{name}{tuple(parameters)}"
        for name in methods
        if not signature_matches(
            fake.__name__, name, parameters := list(inspect.signature(vars(fake)[name]).parameters)[1:]
        )
    ]
    assert not wrong, f"{fake.__name__}: {wrong} differ from {[(n, BUILDER_API[fake.__name__][n]) for n in methods]}"


def test_the_signature_check_rejects_a_wrong_parameter_name_or_count():
    assert signature_matches("IBuilderConfig", "set_timing_cache", ["cache", "ignore_mismatch"])
    assert not signature_matches("IBuilderConfig", "set_timing_cache", ["cache"])
    assert not signature_matches("IBuilderConfig", "set_timing_cache", ["timing_cache", "ignore_mismatch"])
    assert not signature_matches("Builder", "build_serialized_network", ["network", "config", "stream"])


def test_runtime_names_the_runner_needs_are_precise_on_the_lean_bindings():
    for class_name, attribute in [
        ("ICudaEngine", "create_execution_context"),
        ("ICudaEngine", "device_memory_size_v2"),
        ("IExecutionContext", "execute_async_v3"),
        ("IExecutionContext", "set_device_memory"),
        ("IExecutionContext", "set_input_shape"),
        ("IExecutionContext", "set_tensor_address"),
        ("Runtime", "deserialize_cuda_engine"),
        ("ExecutionContextAllocationStrategy", "USER_MANAGED"),
    ]:
        assert hasattr(getattr(lean, class_name), attribute)


def test_every_element_type_names_a_real_tensorrt_data_type():
    from engine.common.dtypes import ELEMENT_TYPES

    assert all(hasattr(lean.DataType, element.tensorrt) for element in ELEMENT_TYPES)
