"""Saving and loading compiled graphs without pickle: ``fxcomp.save`` / ``fxcomp.load``.

One safetensors file holds the weights and, in its metadata, the graph as data: every
node's op, target and arguments (JSON, graph values by name) and every leaf module as its
class and constructor arguments. Loading rebuilds the modules and the graph from that data;
no code from the file is run. Function targets resolve only inside torch, ``operator`` and
fxcomp (never torch's file or serialization functions), module classes only from
``torch.nn`` and fxcomp. A graph captured with keyword inputs or structured outputs (a
Hugging Face model through ``torch.export``) keeps that calling convention: its pytree specs
are stored as JSON (``treespec_dumps``), and an output type from a library fxcomp knows
(transformers' ``ModelOutput`` classes) is imported by its registered name. A checksum over
the metadata and every tensor's bytes catches a file changed after it was saved; a truncated
file fails in safetensors' own checks.

Example::

    fxcomp.save(result.module, "model.fxgraph")
    module = fxcomp.load("model.fxgraph")      # in a fresh process, without the model's class
"""

from __future__ import annotations

import builtins
import hashlib
import importlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn
from torch.fx import Graph, GraphModule, Node
from torch.fx.graph import _PyTreeCodeGen, _PyTreeInfo
from torch.fx.node import _get_qualified_name
from torch.utils._pytree import TreeSpec, treespec_dumps, treespec_loads

from fxcomp.ir.atomic import write_atomic
from fxcomp.ir.errors import FxcompError, InputError

__all__ = ["FORMAT", "load", "save"]

aten = torch.ops.aten

FORMAT = "fxcomp-graph/1"
_MODULE_PREFIXES = ("torch.nn.", "fxcomp.")
_FUNCTION_MODULES = {
    "torch",
    "torch.nn.functional",
    "torch.functional",
    "_operator",
    "torch._C._nn",  # scaled_dot_product_attention
    "fxcomp.nn.fused",
    "fxcomp.nn.attention",
}
_ATEN = "torch.ops.aten."
_FORBIDDEN = ("save", "load", "file", "hub", "jit", "compile", "export", "set_")
_SKIPPED_ARGUMENTS = {"self", "device", "dtype"}
# libraries whose output types load may import to read a calling convention back
_OUTPUT_LIBRARIES = ("transformers.",)


def _encode(value: Any) -> Any:
    if isinstance(value, Node):
        return {"$node": value.name}
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {"$dict": [[k, _encode(v)] for k, v in value.items()]}
    if isinstance(value, slice):
        return {"$slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if isinstance(value, torch.dtype):
        return {"$dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"$device": str(value)}
    if isinstance(value, torch.memory_format):
        return {"$memory_format": str(value).removeprefix("torch.")}
    if value is Ellipsis:
        return {"$ellipsis": True}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise InputError(f"cannot save a {type(value).__name__} argument")


def _decode(value: Any, nodes: dict[str, Node]) -> Any:
    if isinstance(value, list):
        return [_decode(v, nodes) for v in value]
    if not isinstance(value, dict):
        return value
    ((tag, body),) = value.items()
    if tag == "$node":
        return nodes[body]
    if tag == "$tuple":
        return tuple(_decode(v, nodes) for v in body)
    if tag == "$dict":
        return {k: _decode(v, nodes) for k, v in body}
    if tag == "$slice":
        return slice(*(_decode(v, nodes) for v in body))
    if tag in ("$dtype", "$memory_format"):
        result = getattr(torch, body)
        expected = torch.dtype if tag == "$dtype" else torch.memory_format
        if not isinstance(result, expected):
            raise FxcompError(f"not a torch {tag[1:]}: {body}")
        return result
    if tag == "$device":
        return torch.device(body)
    if tag == "$ellipsis":
        return Ellipsis
    raise FxcompError(f"unknown value tag {tag}")


def _target(node: Node) -> str:
    if node.op == "call_function":
        return _get_qualified_name(node.target)  # type: ignore[arg-type]
    return str(node.target)


def _resolve_function(name: str) -> Any:
    if name == "getattr":
        return builtins.getattr
    if name.startswith(_ATEN):  # an ATen operator of a graph torch.export captured
        op, _, overload = name.removeprefix(_ATEN).rpartition(".")
        packet = None if any(word in op for word in _FORBIDDEN) else getattr(aten, op, None)
        function = getattr(packet, overload, None) if packet is not None else None
        if not isinstance(function, torch._ops.OpOverload):
            raise FxcompError(f"the file calls {name}, which fxcomp.load does not allow")
        return function
    module_name, _, attr = name.rpartition(".")
    if module_name == "operator":
        module_name = "_operator"
    if (
        module_name not in _FUNCTION_MODULES
        or attr.startswith("__")
        or any(word in attr for word in _FORBIDDEN)
    ):
        raise FxcompError(f"the file calls {name}, which fxcomp.load does not allow")
    function = getattr(importlib.import_module(module_name), attr, None)
    if function is None:
        raise FxcompError(f"the file calls {name}, which this torch or fxcomp does not have")
    return function


def _module_spec(name: str, module: nn.Module) -> dict[str, Any]:
    cls = type(module)
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    if qualified.startswith("torch.ao.nn."):
        raise InputError(
            f"cannot save quantized module '{name}' with fxcomp.save",
            hint="deploy quantized graphs through a backend (backend='torchscript')",
        )
    if not qualified.startswith(_MODULE_PREFIXES) or isinstance(module, GraphModule):
        raise InputError(
            f"cannot save module '{name}' of class {qualified}",
            hint="fxcomp.save stores graphs of torch.nn and fxcomp layers; keep other code "
            "out of leaf modules, or save TorchScript through the backend",
        )
    arguments: dict[str, Any] = {}
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if parameter.name in _SKIPPED_ARGUMENTS or parameter.kind in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        ):
            continue
        if not hasattr(module, parameter.name):
            if parameter.default is parameter.empty:
                raise InputError(
                    f"cannot save module '{name}' ({qualified}): its constructor argument "
                    f"'{parameter.name}' is not kept as an attribute"
                )
            continue
        value = getattr(module, parameter.name)
        if isinstance(value, nn.Module):
            arguments[parameter.name] = {"$module": _module_spec(f"{name}.{parameter.name}", value)}
        elif isinstance(value, torch.Tensor) or (value is None and parameter.name == "bias"):
            arguments[parameter.name] = value is not None  # e.g. bias=True/False
        else:
            arguments[parameter.name] = _encode(value)
    return {"class": qualified, "arguments": arguments, "training": module.training}


def _build_module(spec: dict[str, Any]) -> nn.Module:
    qualified = spec["class"]
    module_name, _, class_name = qualified.rpartition(".")
    if not qualified.startswith(_MODULE_PREFIXES):
        raise FxcompError(
            f"the file names module class {qualified}, which fxcomp.load does not allow"
        )
    cls = getattr(importlib.import_module(module_name), class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise FxcompError(f"no module class {qualified} in this torch or fxcomp")
    arguments = {}
    for key, value in spec["arguments"].items():
        if isinstance(value, dict) and "$module" in value:
            arguments[key] = _build_module(value["$module"])
        else:
            arguments[key] = _decode(value, {})
    module = cls(**arguments)
    return module.train(spec["training"])


def _tie(module: nn.Module, key: str, source: nn.Module, source_key: str) -> None:
    """Make ``module.<key>`` the very tensor ``source.<source_key>`` is."""
    owner_path, _, attribute = key.rpartition(".")
    source_path, _, source_attribute = source_key.rpartition(".")
    owner = module.get_submodule(owner_path) if owner_path else module
    origin = source.get_submodule(source_path) if source_path else source
    setattr(owner, attribute, getattr(origin, source_attribute))


def _digest(metadata: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(metadata.encode())
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _calling_convention(module: GraphModule) -> dict[str, Any] | None:
    """The pytree calling convention of an export-captured graph (keyword inputs, structured
    outputs) as JSON-able data, or None for a graph called with its placeholders."""
    info = getattr(module.graph._codegen, "pytree_info", None)
    if info is None:
        return None
    try:
        return {
            "orig_args": list(info.orig_args),
            "in_spec": treespec_dumps(info.in_spec) if info.in_spec is not None else None,
            "out_spec": treespec_dumps(info.out_spec) if info.out_spec is not None else None,
        }
    except (NotImplementedError, TypeError) as err:
        raise InputError(
            f"cannot save the module's calling convention: {err}",
            hint="register the output type with torch.utils._pytree (serialized_type_name)",
        ) from err


def _type_names(node: dict[str, Any]) -> list[str]:
    """The serialized type names in a pytree spec's JSON form."""
    own = [node["type"]] if node.get("type") else []
    return own + [n for child in node.get("children_spec", ()) for n in _type_names(child)]


def _treespec(data: str | None, path: Path) -> TreeSpec | None:
    """A stored pytree spec, importing a known library that registers its types."""
    if data is None:
        return None
    try:
        return treespec_loads(data)
    except NotImplementedError as err:
        names = [n for n in _type_names(json.loads(data)[1]) if n.startswith(_OUTPUT_LIBRARIES)]
        unknown = [n for n in names if n.rpartition(".")[0] not in sys.modules]
        if not unknown:
            raise FxcompError(
                f"{path}: the calling convention names an unknown type ({err})"
            ) from err
        for name in unknown:
            try:
                importlib.import_module(name.rpartition(".")[0])
            except ImportError as missing:
                raise FxcompError(
                    f"{path}: the module returns {name}, and its library is not installed",
                    hint=f"pip install {name.partition('.')[0]}",
                ) from missing
        return treespec_loads(data)


def save(module: GraphModule, path: str | Path) -> None:
    """Write ``module`` (a float GraphModule) to ``path`` as graph data plus safetensors.

    Example::

        fxcomp.save(fxcomp.compile(model, x, passes=[fuse()]).module, "fused.fxgraph")
    """
    if not isinstance(module, GraphModule):
        raise InputError(f"fxcomp.save takes a GraphModule, got {type(module).__name__}")
    nodes, modules, tensors = [], {}, {}
    for node in module.graph.nodes:
        target = _target(node)
        if node.op == "call_module" and target not in modules:
            modules[target] = _module_spec(target, module.get_submodule(target))
        if node.op == "get_attr":
            value = module.get_submodule(target.rpartition(".")[0]) if "." in target else module
            attribute = getattr(value, target.rpartition(".")[2])
            if not isinstance(attribute, torch.Tensor):
                raise InputError(f"cannot save attribute '{target}': not a tensor")
            tensors[f"attr:{target}"] = attribute
        nodes.append(
            {
                "name": node.name,
                "op": node.op,
                "target": target,
                "args": _encode(node.args),
                "kwargs": _encode(node.kwargs),
            }
        )
    seen: dict[int, tuple[str, str]] = {}
    aliases = []  # [module, key, source module, source key]: one tensor under two names
    # the state dicts stay alive until the end, so that no tensor a state-dict hook made
    # is freed and its id() taken by another: ids here tell shared tensors apart
    states = {name: module.get_submodule(name).state_dict(keep_vars=True) for name in modules}
    for name, state in states.items():
        for key, tensor in state.items():
            if id(tensor) in seen:
                aliases.append([name, key, *seen[id(tensor)]])
                continue
            seen[id(tensor)] = (name, key)
            tensors[f"{name}.{key}"] = tensor.detach().cpu().contiguous()
    graph = json.dumps(
        {
            "format": FORMAT,
            "class_name": type(module).__name__,
            "training": module.training,
            "nodes": nodes,
            "modules": modules,
            "aliases": aliases,
            "calling": _calling_convention(module),
        }
    )
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    metadata = {"fxcomp": graph, "sha256": _digest(graph, tensors)}
    write_atomic(Path(path), save_tensors(tensors, metadata=metadata))


def load(path: str | Path) -> GraphModule:
    """Rebuild a GraphModule written by ``save``; refuses a changed or truncated file.

    Example::

        module = fxcomp.load("fused.fxgraph")
    """
    path = Path(path)
    try:
        data = path.read_bytes()
        tensors = load_tensors(data)
        header_size = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_size]).get("__metadata__", {})
    except (OSError, SafetensorError, ValueError) as err:
        raise FxcompError(
            f"cannot read {path}: {err}",
            hint="the file is missing, truncated or not written by fxcomp.save",
        ) from err
    graph = metadata.get("fxcomp")
    if graph is None:
        raise FxcompError(f"{path} holds tensors but no fxcomp graph")
    if _digest(graph, tensors) != metadata.get("sha256"):
        raise FxcompError(
            f"{path} was changed after it was saved (checksum mismatch)",
            hint="save the model again from its source",
        )
    spec = json.loads(graph)
    if spec.get("format") != FORMAT:
        raise FxcompError(f"{path} is in format {spec.get('format')!r}; this fxcomp reads {FORMAT}")
    root: dict[str, Any] = {}
    for name, module_spec in spec["modules"].items():
        module = _build_module(module_spec)
        state = {
            k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.")
        }
        for alias, key, source, source_key in spec["aliases"]:
            if alias == name:
                state[key] = tensors[f"{source}.{source_key}"]
        module.load_state_dict(state, strict=True)
        root[name] = module
    for alias, key, source, source_key in spec["aliases"]:
        _tie(root[alias], key, root[source], source_key)
    for key, tensor in tensors.items():
        if key.startswith("attr:"):
            root[key.removeprefix("attr:")] = tensor
    graph_obj = Graph()
    nodes: dict[str, Node] = {}
    for entry in spec["nodes"]:
        op, target = entry["op"], entry["target"]
        if op == "call_function":
            target = _resolve_function(target)
        elif op == "call_method" and target.startswith("_"):
            raise FxcompError(f"the file calls method {target}, which fxcomp.load does not allow")
        args = _decode(entry["args"], nodes)
        kwargs = _decode(entry["kwargs"], nodes)
        if op == "output":
            nodes[entry["name"]] = graph_obj.output(args[0])
            continue
        node = graph_obj.create_node(op, target, tuple(args), kwargs, name=entry["name"])
        nodes[entry["name"]] = node
    calling = spec.get("calling")
    if calling is not None:
        in_spec, out_spec = (
            _treespec(calling["in_spec"], path),
            _treespec(calling["out_spec"], path),
        )
        graph_obj._codegen = _PyTreeCodeGen(_PyTreeInfo(calling["orig_args"], in_spec, out_spec))
    gm = GraphModule(root, graph_obj, spec["class_name"])
    if calling is not None:
        gm._in_spec, gm._out_spec = in_spec, out_spec
    return gm.train(spec["training"])
