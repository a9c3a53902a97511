"""Every TensorRT name the project calls exists in TensorRT 11's real Python bindings.

Runtime names are checked on the lean runtime bindings, which import without a GPU.
Builder names are read from the full bindings' compiled module (it cannot be imported
without TensorRT's libraries, but its identifiers are in the file). A renamed or
removed API therefore fails here, on a machine without TensorRT.
"""

from __future__ import annotations

import ast
import importlib.util
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
    "export/tensorrt.py",
    "export/stages.py",
]
IDENTIFIER = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{2,}")
REMOVED_IN_TENSORRT_11 = [
    ("BuilderFlag", "FP16"),
    ("BuilderFlag", "OBEY_PRECISION_CONSTRAINTS"),
    ("Builder", "build_engine"),
    ("IExecutionContext", "execute_async_v2"),
    ("ICudaEngine", "num_bindings"),
    ("ICudaEngine", "get_binding_shape"),
    ("ICudaEngine", "device_memory_size"),
    ("IBuilderConfig", "max_workspace_size"),
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
    """Precise on classes the lean runtime has; by identifier for builder-side classes it lacks."""
    real_class = getattr(lean, class_name, None)
    if real_class is not None:
        return hasattr(real_class, attribute)
    return in_full_bindings(class_name) and in_full_bindings(attribute)


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
    target = lean
    for part in chain:
        if not hasattr(target, part):
            return all(in_full_bindings(name) for name in chain)
        target = getattr(target, part)
    return True


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
