"""The ONNX Runtime backend of the generation loop.

Runs an exported ``model.onnx`` (see :mod:`lrexport.export`) through an
``onnxruntime.InferenceSession``. With the custom-op library registered and
``in_place=True``, each step binds every ``present_*`` output to the buffer of its
``past_*`` input (IO binding), so the kernel writes the new tokens into the cache in place
and nothing is copied between steps. With ``CUDAExecutionProvider`` first among the
providers, the caches are PyTorch tensors in GPU memory, bound to the session by pointer;
they stay there between steps. Only the token ids, lengths and ranks go up. The logits stay
on the GPU too: each step binds a fresh PyTorch tensor in GPU memory as the ``logits`` output
(from PyTorch's caching allocator, so no device allocation per step), and the caller samples
there; only the next token ids come back to the host. (Bound to host memory instead, the
logits would cost a fresh host array and a copy from the device on every step: 4 MiB at
batch 8 with a 128K vocabulary.)

With ``cuda_graph=True`` (a model exported with ``--cuda-graph``, whose attention reads
``past_len`` in GPU memory), ONNX Runtime captures a decode step as a CUDA graph and then
replays it: one launch per step instead of one per node, and no per-node host work. A replay
reads and writes the addresses of its capture, so the backend owns everything a decode step
binds: the caches (one set per batch size and capacity, reused by later calls: see
:meth:`OrtBackend.new_caches`), and GPU buffers for the token ids, the lengths and the logits,
which each step updates in place. One graph is captured per set of caches; prefill steps (more
than one token) run without one. A model with a progressive rank schedule cannot be captured
(ONNX Runtime runs its rank shape computations on the CPU), and ``lrexport export --cuda-graph``
refuses it.

A CUDA-graph backend runs ONNX Runtime on a stream of its own (``user_compute_stream``), and
:meth:`OrtBackend.device_loop` hands out its step buffers on that stream: a greedy decode loop
(:func:`lrexport.runtime.loop.greedy_on_device`) then writes each step's argmax straight into the
next step's token ids, launches the next replay before the host has read the last ids, and so keeps
the host off the GPU's critical path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lrexport.errors import LrexportError, ShapeError

log = logging.getLogger(__name__)

_NP = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "bfloat16": None}


def bind_gpu_output(binding: Any, name: str, shape: list[int], dtype: torch.dtype, device_id: int) -> torch.Tensor:
    """Bind a fresh PyTorch tensor in GPU memory as output ``name`` of an IO binding and return it.

    The tensor comes from PyTorch's caching allocator (no device allocation per step). ONNX Runtime
    writes on its own stream, so PyTorch's pending work, which may still read memory the allocator
    hands out again, is waited for first; a run returns with ONNX Runtime's stream synced."""
    out = torch.empty(shape, dtype=dtype, device=f"cuda:{device_id}")
    binding.bind_output(name, "cuda", device_id, np.dtype(str(dtype).removeprefix("torch.")), shape, out.data_ptr())
    torch.cuda.current_stream(device_id).synchronize()
    return out


def first_provider(providers: list | None) -> str:
    """The name of the first of ONNX Runtime ``providers`` (names, or ``(name, options)`` pairs)."""
    first = (providers or ["CPUExecutionProvider"])[0]
    return first if isinstance(first, str) else first[0]


@dataclass
class DeviceLoop:
    """A CUDA-graph backend's decode step, driven from the GPU: ``replay()`` launches the step over
    the current contents of ``ids`` (``[B, 1]`` int64) and ``past_len`` (``[B]`` int64) and returns its
    logits buffer (``[B, 1, vocab]``, rewritten by the next replay) without waiting for the GPU. The
    buffers are read and written on ``stream`` (run the loop's work under ``torch.cuda.stream(stream)``),
    in the order it was launched."""

    stream: torch.cuda.Stream
    ids: torch.Tensor
    past_len: torch.Tensor
    replay: Callable[[], torch.Tensor]


class OrtBackend:
    """A loop backend over an ONNX Runtime session (CPU by default).

    ``use_library``: register lrexport's custom-op library (else the model's fallback
    bodies run). ``cache`` lists the cache tensors as ``(name, width, dtype)``. ``cuda_graph``:
    decode steps as CUDA graphs (CUDA only; the model must be exported with ``--cuda-graph``;
    see the module's notes). ``graph_cache_sets``: how many sets of caches (batch size, capacity)
    a CUDA-graph backend keeps for reuse.
    """

    def __init__(self, model_path: str | Path, *, cache: list[tuple[str, int, str]], max_len: int,
                 rank_max: list[int] | None = None, rank_cost: list[int] | None = None, dense_params: int = 0,
                 total_params: int = 0, use_library: bool = True, providers: list[str] | None = None,
                 threads: int | None = None, in_place: bool | None = None, cuda_graph: bool = False,
                 graph_cache_sets: int = 2):
        import onnxruntime as ort

        from lrexport import ortops

        providers = list(providers or ["CPUExecutionProvider"])
        self.device = "cuda" if first_provider(providers) == "CUDAExecutionProvider" else "cpu"
        self.device_id = 0
        if self.device == "cuda" and not isinstance(providers[0], str):
            self.device_id = int(providers[0][1].get("device_id", 0))
        if self.device == "cuda" and (in_place is False or not use_library):
            raise LrexportError("the CUDA backend keeps the caches on the GPU and needs the custom-op library with "
                                "in-place caches (use_library=True, in_place=True)")
        self.cuda_graph = bool(cuda_graph)
        self._stream: torch.cuda.Stream | None = None  # ONNX Runtime's stream, when the backend owns it
        if self.cuda_graph:
            if self.device != "cuda":
                raise LrexportError("cuda_graph=True needs CUDAExecutionProvider first among the providers")
            if graph_cache_sets < 1:
                raise LrexportError(f"graph_cache_sets must be >= 1, got {graph_cache_sets}")
            if rank_max:
                raise LrexportError("cuda_graph=True: the model has a rank input (a progressive schedule), which "
                                    "CUDA graphs cannot capture")
            opts0 = {} if isinstance(providers[0], str) else dict(providers[0][1])
            opts0["enable_cuda_graph"] = "1"
            if "user_compute_stream" not in opts0:  # ONNX Runtime on the backend's stream (device_loop)
                self._stream = torch.cuda.Stream(device=self.device_id)
                opts0["user_compute_stream"] = str(self._stream.cuda_stream)
            providers[0] = ("CUDAExecutionProvider", opts0)
        self._no_graph = None  # run options of the steps that run without a graph (prefill)
        if self.cuda_graph:
            self._no_graph = ort.RunOptions()
            self._no_graph.add_run_config_entry("gpu_graph_id", "-1")
        if use_library:
            opts = ortops.session_options(providers=providers)
        else:
            opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(model_path), sess_options=opts, providers=providers)
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own exception types)
            raise LrexportError(f"ONNX Runtime could not load {model_path}: {e}") from e
        self.cache_names = [c[0] for c in cache]
        self.cache_widths = [c[1] for c in cache]
        self.cache_dtypes = [c[2] for c in cache]
        self.max_len = max_len
        self.rank_max = list(rank_max or [])
        self.rank_cost = list(rank_cost or [])
        self.dense_params, self.total_params = dense_params, total_params
        self.in_place = use_library if in_place is None else in_place
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._logits_info = self._output_info("logits") if self.device == "cuda" else None
        self.present = ["present_" + n.removeprefix("past_") for n in self.cache_names]
        # the IO binding of the last caches: steps over the same buffers rebind only the small inputs
        self._binding = None
        self._binding_key: tuple | None = None
        self._binding_refs: list = []
        # CUDA graphs: cache sets by (batch, capacity), oldest first; per set, its fixed step buffers
        # (token ids, lengths, logits) and its graph id
        self._graph_sets: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._graph_bufs: dict[tuple, dict[str, Any]] = {}
        self._graph_cache_sets = graph_cache_sets
        self._next_graph_id = 0
        self._graph_bound: tuple | None = None  # the caches whose step buffers the binding holds

    def _output_info(self, name: str) -> tuple[int, torch.dtype]:
        """(last dimension, torch dtype) of the model's output ``name`` (the logits: vocabulary size)."""
        out = {o.name: o for o in self.session.get_outputs()}.get(name)
        if out is None:
            raise LrexportError(f"the model has no {name!r} output")
        kinds = {"tensor(float)": torch.float32, "tensor(float16)": torch.float16}
        vocab = out.shape[-1] if out.shape else None
        if out.type not in kinds or not isinstance(vocab, int):
            raise LrexportError(f"the CUDA backend needs float32 or float16 logits with a fixed vocabulary size; "
                                f"the model's {name!r} is {out.type} {out.shape}")
        return vocab, kinds[out.type]

    def new_caches(self, batch: int, capacity: int) -> list[Any]:
        """Zeroed caches: numpy arrays on the CPU, ``torch`` tensors in GPU memory with CUDA.

        With CUDA graphs: the backend's own caches for ``batch`` rows and at least ``capacity``
        positions: the smallest set it keeps that fits, else a new one of ``capacity`` rounded up to a
        multiple of 256 (at most ``max_len``). A graph replays over the caches it was captured with,
        so the sets are reused; positions at and after a row's ``past_len`` are never read, so they
        are not cleared."""
        if self.cuda_graph:
            return self._graph_caches(batch, capacity)
        if self.device == "cpu":
            return [np.zeros((batch, capacity, w), dtype=_NP[d]) for w, d in zip(self.cache_widths, self.cache_dtypes)]
        caches = [torch.zeros(batch, capacity, w, dtype=getattr(torch, d), device=f"cuda:{self.device_id}")
                  for w, d in zip(self.cache_widths, self.cache_dtypes)]
        torch.cuda.synchronize(self.device_id)  # ONNX Runtime runs on its own stream
        return caches

    def step(self, input_ids: torch.Tensor, past_len: torch.Tensor, caches: list[np.ndarray],
             ranks: list[int] | None) -> tuple[torch.Tensor, list[np.ndarray]]:
        """One step; returns the logits ``[B, S, vocab]`` (a tensor on the GPU with CUDA, else on the CPU)
        and the caches (the same buffers when they are updated in place). With CUDA graphs, a decode
        step's logits are the backend's buffer, valid until the next step."""
        if self.cuda_graph and input_ids.shape[1] == 1:  # a replay: no host inputs to bind
            return self._graph_step(caches, input_ids, past_len), caches
        feeds: dict[str, Any] = {"input_ids": np.ascontiguousarray(input_ids.cpu().numpy(), dtype=np.int64),
                                 "past_len": np.ascontiguousarray(past_len.cpu().numpy(), dtype=np.int64)}
        if self.rank_max:
            r = ranks if ranks is not None else self.rank_max
            if len(r) != len(self.rank_max) or any(not 1 <= x <= m for x, m in zip(r, self.rank_max)):
                raise ShapeError(f"ranks must be {len(self.rank_max)} values in [1, stored rank]")
            feeds["ranks"] = np.asarray(r, dtype=np.int64)
        if not self.in_place:
            feeds.update(zip(self.cache_names, caches))
            outs = self.session.run(None, feeds)
            named = dict(zip(self.output_names, outs))
            return torch.from_numpy(named["logits"]), [named[p] for p in self.present]
        binding = self._cache_binding(caches)
        for k, v in feeds.items():
            binding.bind_cpu_input(k, v)
        if self.device == "cuda":
            vocab, dtype = self._logits_info
            logits = bind_gpu_output(binding, "logits", [*feeds["input_ids"].shape, vocab], dtype, self.device_id)
            self._graph_bound = None  # host inputs bound: a replay rebinds its buffers
            self.session.run_with_iobinding(binding, self._no_graph)
            return logits, caches
        binding.bind_output("logits", "cpu")  # rebound (same place): a fresh array, not last step's
        self.session.run_with_iobinding(binding)
        logits = binding.get_outputs()[0].numpy()
        return torch.from_numpy(logits), caches

    def _cache_binding(self, caches: list, key: tuple | None = None) -> Any:
        """The session's IO binding with every cache bound as its ``past_*`` input and ``present_*``
        output (the same memory). Made once per set of cache buffers: binding 2 x layers x caches
        tensors costs host time on every step otherwise (several ms per step on a GPU, where the
        host sets the pace of a small batch)."""
        import onnxruntime as ort

        key = key or self._caches_key(caches)
        if self._binding is not None and key == self._binding_key:
            return self._binding
        binding = self.session.io_binding()
        if self.device == "cpu":
            binding.bind_output("logits", "cpu")  # first: get_outputs() lists outputs in binding order
        refs = []
        for name, present, buf in zip(self.cache_names, self.present, caches):
            if isinstance(buf, torch.Tensor):  # GPU memory, bound by pointer: the kernel writes in place
                if not buf.is_cuda or not buf.is_contiguous():
                    raise ShapeError(f"{name}: the CUDA backend needs contiguous GPU tensors as caches")
                where = ("cuda", buf.device.index, _NP[str(buf.dtype).removeprefix("torch.")], list(buf.shape),
                         buf.data_ptr())
                binding.bind_input(name, *where)
                binding.bind_output(present, *where)
                refs.append(buf)
                continue
            ov = buf if isinstance(buf, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(buf)  # shares memory
            binding.bind_ortvalue_input(name, ov)
            binding.bind_ortvalue_output(present, ov)
            refs += [buf, ov]
        # the buffers stay referenced while they are bound, so their memory (and ids) cannot be reused
        self._binding, self._binding_key, self._binding_refs = binding, key, refs
        self._graph_bound = None
        return binding

    def _graph_caches(self, batch: int, capacity: int) -> list[torch.Tensor]:
        if capacity > self.max_len:
            raise ShapeError(f"a cache of {capacity} positions is longer than the model's maximum length "
                             f"{self.max_len}")
        fits = sorted(k for k in self._graph_sets if k[0] == batch and k[1] >= capacity)
        if fits:
            return self._graph_sets[fits[0]]
        key = (batch, min(self.max_len, -(-capacity // 256) * 256))
        self._sync_stream()  # an evicted set's buffers may go back to PyTorch's allocator
        while len(self._graph_sets) >= self._graph_cache_sets:  # the oldest set and its graphs go
            old_key = next(iter(self._graph_sets))
            old = self._graph_sets.pop(old_key)
            self._graph_bufs.pop(self._caches_key(old), None)
            if self._binding_key == self._caches_key(old):
                self._binding, self._binding_key, self._binding_refs = None, None, []
                self._graph_bound = None
        caches = [torch.zeros(batch, key[1], w, dtype=getattr(torch, d), device=f"cuda:{self.device_id}")
                  for w, d in zip(self.cache_widths, self.cache_dtypes)]
        torch.cuda.synchronize(self.device_id)
        self._graph_sets[key] = caches
        return caches

    def release_caches(self) -> None:
        """CUDA graphs: drop the cache sets the backend keeps (and their step buffers and graphs), so
        that their GPU memory can go once the caller holds no reference either."""
        self._sync_stream()  # nothing of ONNX Runtime's still uses buffers PyTorch may hand out again
        self._graph_sets.clear()
        self._graph_bufs.clear()
        self._binding, self._binding_key, self._binding_refs = None, None, []
        self._graph_bound = None

    def _sync_stream(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _graph_buffers(self, caches: list[torch.Tensor], key: tuple | None = None) -> dict[str, Any]:
        """The fixed step buffers of a set of caches (token ids then lengths in one int64 buffer, the
        logits, the run options of a replay), bound to the session for a replay of its graph. ``key``:
        the caches' ``_caches_key``, when the caller has it."""
        import onnxruntime as ort

        key = key or self._caches_key(caches)
        bufs = self._graph_bufs.get(key)
        B = caches[0].shape[0]
        vocab, dtype = self._logits_info
        if bufs is None:
            dev = f"cuda:{self.device_id}"
            step_in = torch.zeros(2 * B, dtype=torch.int64, device=dev)  # token ids, then lengths: one copy
            graph_id = self._next_graph_id
            self._next_graph_id += 1
            run_options = {}
            for sync in (True, False):
                ro = run_options[sync] = ort.RunOptions()
                ro.add_run_config_entry("gpu_graph_id", str(graph_id))
                if not sync:  # the run returns once its work is launched
                    ro.add_run_config_entry("disable_synchronize_execution_providers", "1")
            bufs = self._graph_bufs[key] = {
                "step_in": step_in, "host": torch.zeros(2 * B, dtype=torch.int64).pin_memory(),
                "logits": torch.empty(B, 1, vocab, dtype=dtype, device=dev), "graph_id": graph_id,
                "run_options": run_options}
            torch.cuda.synchronize(self.device_id)  # the zeros are there before another stream reads them
        if self._graph_bound != key:  # the step buffers bound (a prefill binds host inputs in between)
            binding = self._cache_binding(caches, key)
            ptr = bufs["step_in"].data_ptr()
            out = bufs["logits"]
            binding.bind_input("input_ids", "cuda", self.device_id, np.int64, [B, 1], ptr)
            binding.bind_input("past_len", "cuda", self.device_id, np.int64, [B], ptr + 8 * B)
            binding.bind_output("logits", "cuda", self.device_id, np.dtype(str(dtype).removeprefix("torch.")),
                                list(out.shape), out.data_ptr())
            self._graph_bound = key
        return bufs

    def _replay(self, caches: list[torch.Tensor], sync: bool, key: tuple | None = None) -> torch.Tensor:
        """Replay (or, on first use, run and capture) the graph of ``caches`` over its step buffers;
        ``sync``: return once the GPU is done (else once the work is launched)."""
        bufs = self._graph_buffers(caches, key)  # (re)bound if a prefill bound host inputs in between
        self.session.run_with_iobinding(self._binding, bufs["run_options"][sync])
        return bufs["logits"]

    def _graph_step(self, caches: list[torch.Tensor], input_ids: torch.Tensor, past_len: torch.Tensor) -> torch.Tensor:
        """A decode step of a CUDA-graph backend: the replay of its caches' graph (captured on first
        use, after ONNX Runtime's warm-up runs)."""
        B = input_ids.shape[0]
        if not caches or caches[0].shape[0] != B or tuple(past_len.shape) != (B,):
            raise ShapeError(f"a decode step of {B} rows (input_ids {tuple(input_ids.shape)}, past_len "
                             f"{tuple(past_len.shape)}) over caches of {caches[0].shape[0] if caches else 0} rows")
        key = self._caches_key(caches)
        bufs = self._graph_buffers(caches, key)
        host = bufs["host"]
        host[:B] = input_ids.reshape(B)
        host[B:] = past_len.reshape(B)
        torch.cuda.current_stream(self.device_id).synchronize()  # PyTorch's reads of the last logits
        self._sync_stream()  # and a device loop's last work
        bufs["step_in"].copy_(host)  # pinned host memory, synchronous: the values are there when it returns
        return self._replay(caches, sync=True, key=key)

    def device_loop(self, caches: list[torch.Tensor]) -> DeviceLoop | None:
        """Decode steps driven on the GPU over ``caches`` (this backend's, from :meth:`new_caches`), or
        None where the backend cannot (no CUDA graphs, or no stream of its own)."""
        if not self.cuda_graph or self._stream is None:
            return None
        key = self._caches_key(caches) if isinstance(caches, list) and caches else None
        if key is None or key not in {self._caches_key(c) for c in self._graph_sets.values()}:
            raise LrexportError("device_loop needs caches from this backend's new_caches()")
        torch.cuda.current_stream(self.device_id).synchronize()  # PyTorch's work on the caches (a prefill's reads)
        bufs = self._graph_buffers(caches, key)
        B = caches[0].shape[0]
        return DeviceLoop(stream=self._stream, ids=bufs["step_in"][:B].view(B, 1), past_len=bufs["step_in"][B:],
                          replay=lambda: self._replay(caches, sync=False, key=key))

    @staticmethod
    def _caches_key(caches: list) -> tuple:
        return tuple((buf.data_ptr() if isinstance(buf, torch.Tensor) else id(buf), tuple(buf.shape), str(buf.dtype))
                     for buf in caches)

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits of a batch from an empty cache (the eval ``LogitsFn``)."""
        B, S = input_ids.shape
        logits, _ = self.step(input_ids, torch.zeros(B, dtype=torch.int64), self.new_caches(B, S), None)
        return logits.cpu()
