"""torch.export + XNNPACK lowering of the stages from transforms.py into multi-method ExecuTorch programs (§3.4.2).

One program per role: backbone.pte (embed, context, layer_i, head) and, for `--experts xnnpack` bundles only,
experts.pte (layer_i_expert_e); int4 bundles keep their experts as data in experts.bin (segments.py). XNNPACK puts
every weight tensor into the program's named data store, one segment per tensor, so loading one expert's
method touches only that expert's segments, and freeing the method frees its packed weights.
"""

from __future__ import annotations

import contextlib
import io
import multiprocessing
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from cosmoes.export.transforms import Stage


@dataclass
class LoweredProgram:
    """One serialised .pte with the stored weight bytes each of its methods references."""

    buffer: bytes
    methods: list[str]
    method_bytes: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    # bytes of each memory-planned buffer id, as large as its largest user (the arena a runtime reserves)
    planned_bytes: list[int] = field(default_factory=list)


def export_stage(stage: Stage) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(stage.module, stage.example_inputs, dynamic_shapes=stage.dynamic_shapes,
                                   strict=False)


@contextlib.contextmanager
def _quiet():
    # Expected during export and not actionable by a user: the KV caches are mutated buffers with no initial
    # data, and torch/torchao emit deprecation notices from their own internals.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*was assigned during export.*")
        warnings.filterwarnings("ignore", message="Mutation on a buffer in the model is detected.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        yield


# A program whose every heavy operator is the project's own needs no delegate: NO_DELEGATE lowers it without one.
NO_DELEGATE = {"name": "none"}


def _partitioner(delegate: dict):
    kind = delegate.get("name", "xnnpack")
    if kind == "none":
        return None
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

    if kind != "xnnpack":
        from cosmoes.errors import CosmoesError

        raise CosmoesError(f"unknown delegate {kind!r} in the recipe (this version supports xnnpack)")
    return XnnpackPartitioner(per_op_mode=bool(delegate.get("per_op_mode", False)))


def lower_program(stages: list[Stage], share_state: bool, delegate: dict | None = None,
                  progress: Callable[[str], None] | None = None, jobs: int = 0) -> LoweredProgram:
    """One multi-method .pte: every stage a method, each method's XNNPACK weights their own segments.

    Methods are lowered one at a time, the per-layer ones in `jobs` forked worker processes (0: one per core,
    see export_jobs), and then merged into one program. share_state places all mutable buffers (the KV caches)
    in one arena that no method's activations overlap. This matters because the Python runtime gives all
    methods of a program one shared activation arena: without it, an expert call would overwrite the KV cache
    of a layer.
    """
    with _quiet():
        return _lower(stages, share_state, delegate or {}, progress, jobs)


def _lower_one(stage: Stage, delegate: dict):
    from executorch.exir import EdgeCompileConfig, to_edge_transform_and_lower

    partitioner = _partitioner(delegate)
    edge = to_edge_transform_and_lower({stage.name: export_stage(stage)},
                                       partitioner=[partitioner] if partitioner else [],
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False))
    return edge.exported_program(stage.name)


def _serialize(ep) -> bytes:
    from executorch.exir.serde import serialize as serde

    buf = io.BytesIO()
    serde.save(ep, buf)
    return buf.getvalue()


def _worker(stages: list[Stage], indices: list[int], delegate: dict, conn, readers: list) -> None:
    """A forked child: lowers its stages and sends (index, bytes) for each, or ("error", message); never returns.

    ``readers``: the read ends of the workers' pipes that the fork copied here, this one's own included. They are
    closed first: while this process held its own pipe's read end, a parent killed mid-export left the worker
    blocked in a send forever (its pipe full, never without a reader), holding its memory.
    It leaves with os._exit, not through the interpreter's shutdown: a forked copy of a process with torch's
    threads can hang in finalisers on locks those threads held at the fork.
    """
    for r in readers:
        r.close()
    code = 0
    try:
        torch.set_num_threads(1)  # one process per core already
        with _quiet():
            for i in indices:
                conn.send((i, _serialize(_lower_one(stages[i], delegate))))
    except BaseException as e:  # noqa: BLE001 - reported to the parent, which raises it
        from cosmoes.errors import CosmoesError

        code = 1
        try:  # the project's own errors are already one line for the user: passed on as they are
            conn.send(("error", str(e) if isinstance(e, CosmoesError) else
                       f"lowering failed in a worker process: {type(e).__name__}: {e}"))
        except Exception:  # noqa: BLE001 - the parent sees the exit code instead
            pass
    finally:
        conn.close()
        os._exit(code)


def _lower_forked(stages: list[Stage], remote: list[int], local: list[int], delegate: dict, jobs: int,
                  report) -> dict:
    """`remote` stages in `jobs` forked processes (round robin), `local` ones here meanwhile; name -> program."""
    from multiprocessing.connection import wait

    ctx = multiprocessing.get_context("fork")
    workers, readers = [], []
    for w in range(min(jobs, len(remote))):
        recv, send = ctx.Pipe(duplex=False)
        readers.append(recv)
        proc = ctx.Process(target=_worker, args=(stages, remote[w::jobs], delegate, send, list(readers)), daemon=True)
        proc.start()
        send.close()
        workers.append((proc, recv))
    out = {}
    try:
        for i in local:
            out[stages[i].name] = _lower_one(stages[i], delegate)
            report(stages[i].name)
        open_ = {recv: proc for proc, recv in workers}
        while open_:
            for recv in wait(list(open_)):
                try:
                    i, data = recv.recv()
                except EOFError:
                    open_.pop(recv).join()
                    continue
                if i == "error":
                    from cosmoes.errors import CosmoesError

                    raise CosmoesError(data)
                out[stages[i].name] = _from_worker(data)
                report(stages[i].name)
    finally:
        for proc, recv in workers:
            recv.close()
            if proc.is_alive():
                proc.kill()
            proc.join()
    missing = [stages[i].name for i in remote if stages[i].name not in out]
    if missing:
        from cosmoes.errors import CosmoesError

        codes = sorted({proc.exitcode for proc, _ in workers})
        raise CosmoesError(f"a lowering worker process ended early (exit codes {codes}); not lowered: "
                           + ", ".join(missing))
    return out


def _from_worker(data: bytes):
    # bytes our own forked child just wrote (ExecuTorch's exir serde), never a file from outside
    from executorch.exir.serde import serialize as serde

    return serde.load(io.BytesIO(data))


def export_jobs(requested: int = 0) -> int:
    """Worker processes for lowering: `requested`, else COSMOES_EXPORT_JOBS, else one per core (1: no workers)."""
    if requested > 0:
        return requested
    env = os.environ.get("COSMOES_EXPORT_JOBS", "").strip()
    if env:
        if not (env.isdigit() and 0 < int(env) <= 256):
            from cosmoes.errors import CosmoesError

            raise CosmoesError(f"COSMOES_EXPORT_JOBS={env} is not a number of processes (1-256)")
        return int(env)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def _lower_all(stages: list[Stage], delegate: dict, jobs: int, report) -> dict:
    """Every stage's lowered edge program, by name.

    Stages go to forked workers, one per core, and come back through ExecuTorch's exir serde (the programs are
    the same but for the requires_grad flags of norm weights); the embedding stays in this process (the int8
    embedding's torchao ops do not survive the serde round trip). Every other stage goes through the round trip
    whatever `jobs` is, so a bundle's bytes do not depend on the machine's core count. Merged in stage order.
    """
    remote = [i for i, st in enumerate(stages) if st.kind != "embedding"]
    local = [i for i in range(len(stages)) if i not in set(remote)]
    if jobs > 1 and len(remote) > 1 and "fork" in multiprocessing.get_all_start_methods():
        out = _lower_forked(stages, remote, local, delegate, jobs, report)
    else:
        out = {}
        for i, st in enumerate(stages):
            ep = _lower_one(st, delegate)
            out[st.name] = _from_worker(_serialize(ep)) if i in remote else ep
            report(st.name)
    return {st.name: out[st.name] for st in stages}


def _lower(stages: list[Stage], share_state: bool, delegate: dict, progress, jobs: int = 0) -> LoweredProgram:
    from executorch.exir import EdgeCompileConfig, EdgeProgramManager, ExecutorchBackendConfig
    from executorch.exir.passes import MemoryPlanningPass

    t0 = time.time()
    done = 0

    def report(name: str) -> None:
        nonlocal done
        done += 1
        if progress:
            progress(f"lowered {name} ({done}/{len(stages)}, {time.time() - t0:.0f} s)")

    lowered = _lower_all(stages, delegate, export_jobs(jobs), report)
    merged = EdgeProgramManager(lowered, compile_config=EdgeCompileConfig(_check_ir_validity=False))
    planning = MemoryPlanningPass(alloc_graph_input=True, alloc_graph_output=True, share_mutable_buffers=share_state)
    # Quant fusion turns torchao's dequantize + embedding into ExecuTorch's quantized embedding kernels.
    prog = merged.to_executorch(ExecutorchBackendConfig(memory_planning_pass=planning,
                                                        emit_mutable_buffer_names=share_state,
                                                        # the KV-cache index_put becomes an in-place write
                                                        run_reinplace_pass=True,
                                                        do_quant_fusion_and_const_prop=True))
    names = [s.name for s in stages]
    return LoweredProgram(buffer=prog.buffer, methods=names, method_bytes=method_weight_bytes(prog, names),
                          seconds=time.time() - t0, planned_bytes=planned_bytes(prog))


def planned_bytes(prog) -> list[int]:
    """The program's memory plan as a runtime sees it: per planned buffer, the largest size any method asks for.

    (The .pte's list starts with a reserved id 0 that ExecuTorch's MethodMeta skips; so does this one.) With
    share_mutable_buffers the KV caches get a buffer of their own (the last), which every method lists.
    """
    plans = [list(plan.non_const_buffer_sizes)[1:] for plan in prog.executorch_program.execution_plan]
    width = max(map(len, plans), default=0)
    return [max(sizes[i] if i < len(sizes) else 0 for sizes in plans) for i in range(width)]


def method_weight_bytes(prog, names: list[str]) -> dict[str, int]:
    """Stored weight bytes per method: its delegates' named-data segments plus its own (non-delegated) constants.

    Counted from the lowered program itself, so the numbers are what the .pte holds (int4 packed, the scale
    dtype XNNPACK chose), not an estimate from the eager tensors. KV caches are planned memory, not stored.
    """
    out = {}
    for name in names:
        ep = prog.exported_program(name)
        total = 0
        for node in ep.graph_module.graph.nodes:
            if node.op == "get_attr":
                sub = getattr(ep.graph_module, node.target)
                store = getattr(sub, "named_data_store_output", None)
                if store is not None:
                    total += sum(len(store.buffers[entry.buffer_index]) for entry in store.pte_data.values())
        # the KV caches are mutated (non-persistent) buffers: planned memory with no stored data
        mutable = set(ep.graph_signature.buffers_to_mutate.values())
        consts = [t for k, t in [*ep.constants.items(), *ep.state_dict.items()] if k not in mutable]
        total += sum(t.numel() * t.element_size() for t in consts if isinstance(t, torch.Tensor))
        out[name] = total
    return out


__all__ = ["LoweredProgram", "export_jobs", "export_stage", "lower_program", "method_weight_bytes", "planned_bytes"]
