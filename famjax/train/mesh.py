"""The device mesh (data, fsdp, tensor) and logical-axis rules -> shardings of params, batches and state.

Parameters carry logical axis names ("vocab", "embed", "q_heads", ...; see famjax/model/modules.py); the
config's `mesh.rules` maps each name to a mesh axis, a tuple of axes, or None (replicated). Batches are
sharded on their leading "batch" axis. The block axis of the FAM recurrence is sequential (each block's FAM
depends on the previous one) and is never sharded; rows of the batch are the only data parallelism.
"""
from __future__ import annotations

import contextlib
import logging

import jax
import numpy as np
from flax.core import spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from famjax.model import sharding
from famjax.train.config import MESH_AXES

_LOG = logging.getLogger(__name__)


def mesh_shape(shape, num_devices: int) -> tuple[int, ...]:
    """Returns the mesh shape with a -1 replaced by what fills num_devices; raises if it does not fit."""
    shape = [int(s) for s in shape]
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ValueError(f"mesh.shape {tuple(shape)} cannot fill {num_devices} devices")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ValueError(f"mesh.shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"there are {num_devices}")
    return tuple(shape)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """Returns a Mesh with axes (data, fsdp, tensor) over `devices` (default: all devices of all hosts)."""
    devices = jax.devices() if devices is None else list(devices)
    shape = mesh_shape(mesh_cfg.shape, len(devices))
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # noqa: BLE001  # CPU / odd topologies: plain order is fine
        arr = np.asarray(devices).reshape(shape)
    return Mesh(arr, MESH_AXES)


def logical_to_spec(logical: PartitionSpec | tuple, rules, mesh: Mesh, shape=None) -> PartitionSpec:
    """Returns the mesh PartitionSpec of a logical one (see famjax.model.sharding.logical_to_spec)."""
    return sharding.logical_to_spec(logical, rules, mesh.shape, shape)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules):
    """Context in which jitted model code sees the mesh and the logical rules: the model's activation
    constraints (famjax.model.sharding.constrain) take effect inside it."""
    with jax.set_mesh(mesh), spmd.logical_axis_rules(tuple(rules)):
        yield


def tree_shardings(logical_specs, abstract, rules, mesh: Mesh):
    """Returns NamedShardings for a tree of arrays given a matching tree of logical PartitionSpecs."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, logical_to_spec(spec, rules, mesh, x.shape)),
        logical_specs, abstract, is_leaf=lambda s: isinstance(s, PartitionSpec))


def batch_spec(ndim: int, rules, mesh: Mesh, batch_axis: int = 0, shape=None) -> PartitionSpec:
    """Returns the PartitionSpec of an array whose axis `batch_axis` is the batch (other axes whole)."""
    logical = [None] * ndim
    logical[batch_axis] = "batch"
    return logical_to_spec(PartitionSpec(*logical), rules, mesh, shape)


def batch_sharding(x, rules, mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    return NamedSharding(mesh, batch_spec(np.ndim(x), rules, mesh, batch_axis, np.shape(x)))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def global_batch(local: dict, rules, mesh: Mesh) -> dict:
    """Returns the global batch (jax.Arrays sharded on rows) from this process's rows (numpy dict)."""
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        global_shape = (v.shape[0] * jax.process_count(),) + v.shape[1:]
        sharding = NamedSharding(mesh, batch_spec(v.ndim, rules, mesh, 0, global_shape))
        out[k] = jax.make_array_from_process_local_data(sharding, v, global_shape)
    return out
