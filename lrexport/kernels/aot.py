"""Ahead-of-time Triton decode kernels for the CUDA kernel of the ONNX Runtime library.

At export, every ``LowRankKVAttention`` node of a float16 model gets the decode kernel of
:mod:`lrexport.kernels.triton_latent` compiled for its shapes (``kernel_config``, the same
specialization the PyTorch path runs) and a GPU architecture, as two node attributes:

* ``cuda_cubin`` (string): the cubin, as ``ptxas`` wrote it;
* ``cuda_kernel`` (string): ``key=value`` pairs the launcher needs: ``abi`` (the argument
  order below), ``arch`` (compute capability, e.g. 90), ``name``, ``warps``, ``shared``
  (dynamic shared memory bytes), ``block_n``, ``rv_p``, ``waves`` and ``d16``: the integer
  arguments compiled as multiples of 16 (the launcher checks them, and that every pointer is
  16-byte aligned, and otherwise runs its own CUDA C++ kernel).

The library (``custom_ops/src/cuda/triton_aot.cc``) loads the cubin with the CUDA driver on the
first decode call on a device of that compute capability and launches it on ONNX Runtime's
stream for one-token steps; prefill and other devices run the CUDA C++ kernel. Compiling needs
only Triton (its ``ptxas``), not a GPU, so exports on CPU machines carry GPU kernels too.

The launcher passes the kernel's arguments in the order of :data:`ABI_ARGS` (the
non-constexpr parameters of ``_latent_attn_fwd`` with ``S`` fixed to 1), then Triton's two
scratch pointers (null: the kernel uses none, checked here).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import onnx

from lrexport.kernels import triton_latent as tl_k

log = logging.getLogger(__name__)

ABI = 1
ABI_ARGS = ("Q", "sq_b", "sq_s", "CK", "sck_b", "sck_p", "PK", "spk_b", "spk_p", "CV", "scv_b", "scv_p", "PV",
            "spv_b", "spv_p", "KUP", "KBIAS", "COS", "SIN", "PAST", "OUT", "so_b", "so_s", "ACC", "MAX", "SUM",
            "split_len", "nsplit", "qk_scale", "RK", "RV")
# the most dynamic shared memory per block, by compute capability (CUDA programming guide)
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}
DEFAULT_ARCH = 90
TUNING_ENV = "LREXPORT_CUDA_TUNING"
SPLIT_RANKS_CHOICES = ("auto", "k", "v", "kv", "none")


# the tuning items that are switches (0 or 1)
BOOL_TUNINGS = ("swap", "stage_tables", "gluon", "gluon_narrow", "gluon_rel", "gluon_ranks", "gluon_lazy")


@dataclass(frozen=True)
class Tuning:
    """The decode kernel's settings that change its speed, not its results.

    ``block_n`` cached positions per tile, ``num_warps``, ``num_stages`` (None: the tuned default of
    :data:`triton_latent.DECODE_STAGES` for the cache kind), ``waves`` and ``min_split`` (programs per
    multiprocessor, None: :func:`triton_latent.decode_waves` for the cache kind, and the fewest positions per split:
    how far the cached positions are split; read by the launcher at run time), ``swap`` (the positions as the MMA
    rows) and ``maxnreg`` (a register cap per thread; None: :data:`triton_latent.DECODE_MAXNREG` for the cache kind
    where ``k_up`` stays on chip, none where it is streamed; 0: none), ``split_ranks``
    (:data:`triton_latent.SPLIT_RANKS`: ``auto``, ``k``, ``v``, ``kv`` or ``none``), ``stage_tables``
    (:data:`triton_latent.DECODE_STAGE_TABLES`) and ``gluon`` (1: compile the Gluon decode kernel of
    :mod:`gluon_latent` for the nodes it takes, with the same launcher arguments; 0: the Triton kernel for all),
    ``gluon_narrow`` (1: its query rows padded to 8 where they fit, :func:`gluon_latent.query_rows`),
    ``gluon_rel`` (1: its RoPE by relative position, :data:`gluon_latent.RELATIVE_ROPE`; for tables of rotary
    embeddings only), ``gluon_ranks`` (1: the Gluon kernel at every rank the PyTorch path runs it at,
    :func:`gluon_latent.preferred`; 0: at rank 64 only), ``gluon_lazy`` (1: its softmax maximum a tile late,
    :data:`gluon_latent.LAZY_MAX`) and ``gluon_tables`` (its stages of table rows, 1 or 2; None:
    :data:`gluon_latent.TABLE_STAGES`). The defaults are the PyTorch path's.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int | None = None
    waves: int | None = None
    min_split: int = tl_k.DECODE_MIN_SPLIT
    swap: bool = True
    maxnreg: int | None = None
    split_ranks: str = tl_k.SPLIT_RANKS
    stage_tables: bool = tl_k.DECODE_STAGE_TABLES
    gluon: bool = True
    gluon_narrow: bool = True
    gluon_rel: bool = False
    gluon_ranks: bool = True
    gluon_lazy: bool = False
    gluon_tables: int | None = None

    def waves_for(self, spec: DecodeSpec) -> int:
        """The split rule's programs per multiprocessor for the nodes of ``spec``: ``waves``, or the PyTorch path's
        default for their cache kind (:func:`triton_latent.decode_waves`)."""
        return self.waves or tl_k.decode_waves(spec.group_size, spec.bits)

    @classmethod
    def parse(cls, text: str) -> Tuning:
        """``"block_n=64,num_warps=8,num_stages=3,waves=8,min_split=512,swap=0,maxnreg=168,split_ranks=kv"`` (any
        subset)."""
        kw: dict = {}
        fields = {f.name for f in dataclasses.fields(cls)}
        for item in filter(None, (x.strip() for x in text.split(","))):
            key, _, val = item.partition("=")
            val = val.strip()
            if key == "split_ranks":
                if val not in SPLIT_RANKS_CHOICES:
                    raise ValueError(f"bad kernel tuning item {item!r}: split_ranks is one of "
                                     f"{', '.join(SPLIT_RANKS_CHOICES)}")
                kw[key] = "" if val == "none" else val
                continue
            if key not in fields or not val.lstrip("-").isdigit():
                raise ValueError(f"bad kernel tuning item {item!r}: expected one of {sorted(fields - {'split_ranks'})} "
                                 "= an integer, or split_ranks = auto|k|v|kv|none")
            kw[key] = bool(int(val)) if key in BOOL_TUNINGS else int(val)
        t = cls(**kw)
        if t.block_n not in (16, 32, 64, 128) or t.num_warps not in (1, 2, 4, 8) or (t.waves or 1) < 1 or (
                t.min_split < 1) or (
                t.num_stages is not None and not 1 <= t.num_stages <= 5) or (
                t.maxnreg is not None and t.maxnreg != 0 and not 24 <= t.maxnreg <= 255) or (
                t.gluon_tables not in (None, 1, 2)):
            raise ValueError(f"kernel tuning out of range: {t} (block_n 16/32/64/128, num_warps 1/2/4/8, "
                             "num_stages 1-5, waves >= 1, min_split >= 1, maxnreg 0 or 24-255, gluon_tables 1/2)")
        return t

    @classmethod
    def from_env(cls) -> Tuning:
        """From ``LREXPORT_CUDA_TUNING`` when it is set (benchmarks compare settings with it), else the defaults."""
        text = os.environ.get(TUNING_ENV, "")
        try:
            return cls.parse(text)
        except ValueError as e:
            raise ValueError(f"{TUNING_ENV}: {e}") from None


@dataclass(frozen=True)
class DecodeSpec:
    """What the compiled decode kernel depends on (one per distinct node structure)."""

    num_heads: int
    num_kv_heads: int
    group_size: int
    head_dim: int
    rk: int
    rv: int
    bits: int
    quant_group: int
    window: int
    has_k_bias: bool
    k_width: int  # cache row widths: elements (float caches) or code bytes
    v_width: int
    kp_width: int  # params per row (bits > 0)
    vp_width: int
    row_splits: bool = False  # LowRankKVAttentionDeviceLen: each row splits its own length (ROW_SPLITS)

    @classmethod
    def for_caches(cls, *, num_heads: int, num_kv_heads: int, group_size: int, head_dim: int, rk: int, rv: int,
                   bits: int = 0, quant_group: int = 0, window: int = 0, has_k_bias: bool = False,
                   row_splits: bool = False) -> DecodeSpec:
        """The spec of a node whose caches are laid out as the exporter lays them out: per row, ``G * rk`` key and
        ``G * rv`` value channels (float, or ``bits``-bit codes packed into bytes with a float16 scale and zero
        point per ``quant_group`` channels)."""
        G = num_kv_heads // group_size
        if bits:
            widths = dict(k_width=G * rk * bits // 8, v_width=G * rv * bits // 8,
                          kp_width=2 * G * rk // quant_group, vp_width=2 * G * rv // quant_group)
        else:
            widths = dict(k_width=G * rk, v_width=G * rv, kp_width=0, vp_width=0)
        return cls(num_heads=num_heads, num_kv_heads=num_kv_heads, group_size=group_size, head_dim=head_dim, rk=rk,
                   rv=rv, bits=bits, quant_group=quant_group if bits else 0, window=window, has_k_bias=has_k_bias,
                   row_splits=row_splits, **widths)


@dataclass
class CompiledDecode:
    cubin: bytes
    meta: str


def _arg_types(bits: int) -> dict[str, str]:
    cache = "*u8" if bits else "*fp16"
    return dict(Q="*fp16", CK=cache, PK="*fp16", CV=cache, PV="*fp16", KUP="*fp16", KBIAS="*fp16", COS="*fp16",
                SIN="*fp16", PAST="*i32", OUT="*fp16", ACC="*fp32", MAX="*fp32", SUM="*fp32", qk_scale="fp32")


def _int_args(spec: DecodeSpec) -> dict[str, int]:
    """The integer arguments' values, for their multiple-of-16 attributes (``P`` cancels: the batch
    strides are ``P`` times the row strides)."""
    q = spec.num_heads * spec.head_dim
    kp = spec.kp_width if spec.bits else spec.k_width
    vp = spec.vp_width if spec.bits else spec.v_width
    return dict(sq_b=q, sq_s=q, sck_b=spec.k_width, sck_p=spec.k_width, spk_b=kp, spk_p=kp, scv_b=spec.v_width,
                scv_p=spec.v_width, spv_b=vp, spv_p=vp, so_b=0, so_s=0, split_len=64, nsplit=1, RK=spec.rk,
                RV=spec.rv)


def _interpreted() -> bool:
    """Whether this process runs Triton's interpreter (``TRITON_INTERPRET=1``): its kernels are then
    interpreted functions, and the interpreter patches ``triton.language`` while it runs, so
    kernels are compiled in a child process instead."""
    return type(tl_k._latent_attn_fwd).__name__ == "InterpretedFunction"


def _compile_in_child(spec: DecodeSpec, arch: int, tuning: Tuning) -> CompiledDecode:
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "kernel")
        code = ("import json, sys; from lrexport.kernels import aot; "
                "c = aot.compile_decode(aot.DecodeSpec(**json.loads(sys.argv[1])), int(sys.argv[2]), "
                "aot.Tuning(**json.loads(sys.argv[4]))); "
                "open(sys.argv[3] + '.cubin', 'wb').write(c.cubin); open(sys.argv[3] + '.meta', 'w').write(c.meta)")
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        proc = subprocess.run([sys.executable, "-c", code, json.dumps(dataclasses.asdict(spec)), str(arch), out,
                               json.dumps(dataclasses.asdict(tuning))], env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling the decode kernel in a child process failed: {proc.stderr.strip()[-2000:]}")
        with open(out + ".cubin", "rb") as f, open(out + ".meta") as g:
            return CompiledDecode(cubin=f.read(), meta=g.read())


def supported(spec: DecodeSpec) -> str:
    """'' when the decode kernel takes ``spec``, else why not."""
    if not tl_k.supports(spec.head_dim, spec.rk, spec.bits, spec.quant_group):
        return (f"head dim {spec.head_dim}, key rank {spec.rk}, bits {spec.bits}, quantization group "
                f"{spec.quant_group} (the Triton kernel needs a power-of-two head dim >= 32 and a key rank that "
                "is a multiple of 16)")
    return ""


def compile_decode(spec: DecodeSpec, arch: int = DEFAULT_ARCH, tuning: Tuning | None = None) -> CompiledDecode:
    """Compile the float16 decode kernel for ``spec`` and compute capability ``arch`` (no GPU needed).

    ``tuning``: the kernel settings (default: :meth:`Tuning.from_env`)."""
    tuning = tuning or Tuning.from_env()
    if tl_k.triton is None:
        raise RuntimeError("compiling GPU kernels needs triton")
    why = supported(spec)
    if why:
        raise ValueError(f"no Triton decode kernel for {why}")
    if _interpreted():
        return _compile_in_child(spec, arch, tuning)
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import ASTSource
    # other nodes and architectures: the Triton kernel
    if tuning.gluon and arch == 90 and gluon_spec(spec, tuning.gluon_ranks):
        return _compile_gluon(spec, arch, tuning)
    fn = tl_k._latent_attn_fwd
    cfg = tl_k.kernel_config(S=1, D=spec.head_dim, nrep=spec.num_heads // spec.num_kv_heads, rk=spec.rk,
                             rv=spec.rv, bits=spec.bits, quant_group=spec.quant_group, itemsize=2,
                             block_n=tuning.block_n, swap=tuning.swap, split_ranks=tuning.split_ranks,
                             stage_tables=tuning.stage_tables)
    const = {**cfg, "HQ": spec.num_heads, "HKV": spec.num_kv_heads, "GS": spec.group_size, "SPLIT": True,
             "WINDOW": spec.window, "HAS_BIAS": spec.has_k_bias, "IEEE": False, "S": 1,
             "ROW_SPLITS": spec.row_splits}
    types = _arg_types(spec.bits)
    ints = _int_args(spec)
    args = [n for n in fn.arg_names if n not in const]
    if tuple(args) != ABI_ARGS:
        raise RuntimeError(f"_latent_attn_fwd's run-time arguments changed ({args}); update ABI_ARGS and the "
                           "launcher in custom_ops/src/cuda/triton_aot.cc")
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    d16 = [n for n in args if n in ints and n != "nsplit" and ints[n] % 16 == 0]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in args if sig[n].startswith("*") or n in d16}
    limit = SMEM_LIMIT.get(arch, min(SMEM_LIMIT.values()))
    tried = []
    stages0 = tuning.num_stages or tl_k.DECODE_STAGES[bool(spec.bits)]
    maxnreg = tl_k.decode_maxnreg(spec.bits, tuning.num_warps, tuning.maxnreg, tl_k.kup_on_chip(cfg, 2))
    for block_n, stages in tl_k.fallbacks(cfg["BLOCK_N"], stages0):
        src = ASTSource(fn, sig, constexprs={**const, "BLOCK_N": block_n}, attrs=attrs)
        k = tl_k.triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                options=dict(num_warps=tuning.num_warps, num_stages=stages or 1)
                                | ({} if maxnreg is None else {"maxnreg": maxnreg}))
        md = k.metadata
        tried.append(f"{block_n}x{stages}: {md.shared} B")
        if md.shared > limit:
            continue
        if md.global_scratch_size or md.profile_scratch_size or md.num_ctas != 1:
            raise RuntimeError(f"the compiled decode kernel needs global scratch memory or clusters ({md}); the "
                               "launcher passes none")
        meta = (f"abi={ABI} arch={arch} name={md.name} warps={md.num_warps} shared={md.shared} block_n={block_n} "
                f"rv_p={cfg['RV_P']} waves={tuning.waves_for(spec)} min_split={tuning.min_split} "
                f"maxnreg={maxnreg or 0} "
                f"row_splits={int(spec.row_splits)} d16={','.join(d16)}")
        return CompiledDecode(cubin=bytes(k.asm["cubin"]), meta=meta)
    raise RuntimeError(f"the decode kernel does not fit the {limit} bytes of shared memory of sm_{arch} "
                       f"({'; '.join(tried)})")


def gluon_spec(spec: DecodeSpec, all_ranks: bool = True) -> bool:
    """Whether the Gluon decode kernel (:mod:`gluon_latent`) takes the nodes of ``spec``: per-head latents at its
    head dim, of the ranks the PyTorch path runs it at (:func:`gluon_latent.preferred`; not ``all_ranks``: rank
    64 only), float caches laid out as the exporter lays them out, no key bias or window, at
    most :data:`gluon_latent.ROWS` query heads per KV head."""
    from lrexport.kernels import gluon_latent as glk

    ranks = (glk.rank_ok(spec.rk) and glk.rank_ok(spec.rv) and glk.preferred(spec.rk, spec.rv)
             and (all_ranks or spec.rk == spec.rv == glk.RANK))
    return (glk.gluon is not None and spec.group_size == 1 and spec.head_dim == glk.HEAD_DIM and spec.bits == 0
            and ranks and spec.k_width == spec.num_kv_heads * spec.rk and spec.v_width == spec.num_kv_heads * spec.rv
            and not spec.has_k_bias and spec.window == 0 and spec.num_heads // spec.num_kv_heads <= glk.ROWS)


def _compile_gluon(spec: DecodeSpec, arch: int, tuning: Tuning) -> CompiledDecode:
    """The Gluon decode kernel for ``spec`` (see :func:`gluon_spec`), with the launcher arguments of the Triton one
    (:data:`ABI_ARGS`) and the same metadata."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from lrexport.kernels import gluon_latent as glk

    if arch != 90:
        raise ValueError(f"the Gluon decode kernel is for compute capability 9.0 (wgmma), not {arch}")
    fn = glk._latent_attn_gluon
    nrep = spec.num_heads // spec.num_kv_heads
    rv_p = glk.acc_rows(spec.rv)
    const = dict(HKV=spec.num_kv_heads, D=glk.HEAD_DIM, R=glk.RANK, NREP=nrep,
                 M=glk.query_rows(nrep, tuning.gluon_narrow), BLOCK=glk.BLOCK_N, ROPE16=True,
                 ROW_SPLITS=spec.row_splits, REL=tuning.gluon_rel, RANK_K=spec.rk, RANK_V=spec.rv, RV_P=rv_p,
                 LAZY=tuning.gluon_lazy, TABLE_STAGES=tuning.gluon_tables or glk.TABLE_STAGES,
                 SCK_P=spec.k_width if glk.CONST_STRIDES else 0, SCV_P=spec.v_width if glk.CONST_STRIDES else 0)
    args = [n for n in fn.arg_names if n not in const]
    if tuple(args) != ABI_ARGS:
        raise RuntimeError(f"gluon_latent._latent_attn_gluon's run-time arguments ({args}) are not the launcher's "
                           f"{ABI_ARGS}")
    types = _arg_types(0)
    ints = _int_args(spec)
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in fn.arg_names}
    d16 = [n for n in args if n in ints and n != "nsplit" and ints[n] % 16 == 0]
    attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in args if sig[n].startswith("*") or n in d16}
    k = tl_k.triton.compile(GluonASTSource(fn, sig, constexprs=const, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                            options=dict(num_warps=4, **({"maxnreg": tuning.maxnreg} if tuning.maxnreg else {})))
    md = k.metadata
    if md.shared > SMEM_LIMIT[arch] or md.global_scratch_size or md.profile_scratch_size or md.num_ctas != 1:
        raise RuntimeError(f"the compiled Gluon decode kernel does not fit the launcher ({md})")
    cubin = bytes(k.asm["cubin"])
    waves = tuning.waves or gluon_waves(cubin, md.shared, tuning.waves_for(spec))
    meta = (f"abi={ABI} arch={arch} name={md.name} warps={md.num_warps} shared={md.shared} block_n={glk.BLOCK_N} "
            f"rv_p={rv_p} waves={waves} min_split={tuning.min_split} maxnreg={tuning.maxnreg or 0} "
            f"row_splits={int(spec.row_splits)} d16={','.join(d16)} kernel=gluon")
    return CompiledDecode(cubin=cubin, meta=meta)


def gluon_waves(cubin: bytes, shared: int, default: int) -> int:
    """The split rule's programs per multiprocessor for a compiled Gluon decode kernel: the blocks of it that fit a
    multiprocessor of sm_90 (its registers as ``cuobjdump`` reports them, and its shared memory), as the PyTorch
    path's :func:`gluon_latent.resident_blocks`; ``default`` where Triton's ``cuobjdump`` is missing."""
    from lrexport.kernels import gluon_latent as glk

    try:
        registers = cubin_resources(cubin)["registers"]
    except (FileNotFoundError, RuntimeError, subprocess.CalledProcessError) as e:
        log.info("no register count for the Gluon decode kernel (%s); %d programs per multiprocessor", e, default)
        return default
    return glk.blocks_per_sm(registers, shared)


def cuobjdump() -> str:
    """Triton's ``cuobjdump`` (it ships one with its CUDA tools)."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        raise FileNotFoundError(f"Triton's cuobjdump is missing ({tool})")
    return tool


def cubin_dump(cubin: bytes, flag: str) -> str:
    """``cuobjdump FLAG`` of a cubin (e.g. ``-sass``, ``--dump-resource-usage``)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


def cubin_resources(cubin: bytes) -> dict:
    """Registers, stack and local (spill) bytes of a cubin's kernel, as ``cuobjdump`` reports them."""
    out = cubin_dump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    if not m:
        raise RuntimeError(f"no resource usage in cuobjdump's output: {out[-500:]}")
    reg, stack, _, local = map(int, m.groups())
    return dict(registers=reg, stack_bytes=stack, local_bytes=local)


def parse_meta(meta: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in meta.split())


def _static_last_dim(model: onnx.ModelProto, name: str) -> int | None:
    for vi in list(model.graph.input) + list(model.graph.value_info):
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            return dims[-1].dim_value if dims and dims[-1].HasField("dim_value") else None
    return None


def node_spec(model: onnx.ModelProto, node: onnx.NodeProto) -> DecodeSpec | str:
    """The decode kernel's spec of a ``LowRankKVAttention`` (or ``LowRankKVAttentionDeviceLen``) node, or why it
    has none."""
    from lrexport.emit.functions import LOWRANK_OP_DEVICE_LEN
    a = {x.name: onnx.helper.get_attribute_value(x) for x in node.attribute}
    inits = {t.name: t for t in model.graph.initializer}
    inp = list(node.input) + [""] * (13 - len(node.input))
    k_up = inits.get(inp[8])
    if k_up is None or k_up.data_type != onnx.TensorProto.FLOAT16:
        return "k_up is not a float16 initializer (the GPU kernels are compiled for float16 models)"
    G, rk, sD = k_up.dims
    Hkv, gs = int(a["num_kv_heads"]), int(a.get("group_size", 1))
    D = sD // gs
    bits, qg = int(a.get("bits", 0)), int(a.get("quant_group", 32))
    widths = [_static_last_dim(model, inp[i]) for i in (3, 4, 5, 6)]
    if widths[0] is None or widths[2] is None or (bits and (widths[1] is None or widths[3] is None)):
        return "the cache inputs have no static widths"
    if bits:
        rv = widths[3] * qg // (2 * G)  # params: a float16 scale and zero point per group of qg channels
    else:
        rv = widths[2] // G
    return DecodeSpec(num_heads=int(a["num_heads"]), num_kv_heads=Hkv, group_size=gs, head_dim=D, rk=rk, rv=rv,
                      bits=bits, quant_group=qg if bits else 0, window=int(a.get("window", 0)),
                      has_k_bias=bool(inp[9]), k_width=widths[0], v_width=widths[2], kp_width=widths[1] or 0,
                      vp_width=widths[3] or 0, row_splits=node.op_type == LOWRANK_OP_DEVICE_LEN)


def attach_cuda_kernels(model: onnx.ModelProto, arch: int = DEFAULT_ARCH, tuning: Tuning | None = None) -> dict:
    """Compile and attach the decode kernels to the model's ``LowRankKVAttention`` nodes (in place).

    ``tuning``: the kernel settings (default: :meth:`Tuning.from_env`). Returns a summary:
    ``{"arch", "tuning", "nodes", "kernels", "skipped": {node: why}}``.
    """
    tuning = tuning or Tuning.from_env()
    from lrexport.emit.functions import LOWRANK_OPS
    from lrexport.util import progress

    nodes = [n for n in model.graph.node if n.op_type in LOWRANK_OPS]
    specs, skipped = {}, {}
    for n in nodes:
        s = node_spec(model, n)
        why = s if isinstance(s, str) else supported(s)
        if why:
            skipped[n.name] = why
        else:
            specs[n.name] = s
    compiled = {}
    for s in progress(sorted(set(specs.values()), key=repr), desc=f"GPU kernels (sm_{arch})",
                          unit="kernel"):
        compiled[s] = compile_decode(s, arch, tuning)
    for n in nodes:
        if n.name not in specs:
            continue
        c = compiled[specs[n.name]]
        for attr in [x for x in n.attribute if x.name in ("cuda_kernel", "cuda_cubin")]:
            n.attribute.remove(attr)
        n.attribute.extend([onnx.helper.make_attribute("cuda_kernel", c.meta),
                            onnx.helper.make_attribute("cuda_cubin", c.cubin)])
    for name, why in skipped.items():
        log.info("no GPU decode kernel for %s: %s", name, why)
    return {"arch": arch, "tuning": dataclasses.asdict(tuning), "nodes": len(specs), "kernels": len(compiled),
            "skipped": skipped}
