"""The samples: the C++ program ``lrexport_generate`` (samples/cpp) embeds an exported model with the
ONNX Runtime C++ API and generates exactly the greedy token ids of the Python runtime, with and
without the custom-op library, for float and 4-bit Palu latent caches and low-rank weights whose
rank input follows a schedule that lowers the ranks mid-generation; it stops at the exported eos
ids, applies every schedule form as lrexport/schedule.py does, and fails cleanly on bad input.
The Python sample (samples/python/generate.py) prints the same ids.

The C++ build (build/samples-cpp/, ~15 s the first time) is skipped only when there is no CMake
or C++ compiler; a failing build (or a failing header fetch) fails the tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from lrexport import ortops
from lrexport.compile import CompressedModel
from lrexport.config import config_to_dict
from lrexport.export import export_onnx, load_onnx_backend
from lrexport.factorize.registry import Factors
from lrexport.passes.latent_kv import LatentKVPass
from lrexport.passes.lowrank_linear import LowRankLinearPass
from lrexport.plan import Plan
from lrexport.runtime import generate
from lrexport.schedule import Constant, Cosine, Linear, Schedule, Steps
from lrexport.trace.export import trace
from tests.test_latent_kv import GQA, exact_layers
from tests.tiny import tiny_loaded

ROOT = Path(__file__).resolve().parent.parent
MAX_LEN = 64
NEW_TOKENS = 16
PROMPTS = [[5, 17, 33, 2, 9, 41], [60, 3, 88, 14], [7]]
SCHEDULE = Schedule(form=Steps(((1, 1.0), (5, 0.5))), min_rank=1)  # stored ranks, then half from step 5
CASES = {"latent-float": None, "latent-4bit": 4}  # Palu latent KV cache bits


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build_cpp = _module("lrexport_sample_build_cpp", ROOT / "samples" / "build_cpp.py")


@pytest.fixture(scope="module")
def program() -> Path:
    reason = build_cpp.missing_tools()
    if reason:
        pytest.skip(f"the C++ sample cannot be built here: {reason}")
    return build_cpp.build()  # builds liblrexport_ops.so too


@pytest.fixture(scope="module")
def ops_lib(program) -> Path:
    return ortops.library_path()


def _export(bits: int | None, folder: Path) -> Path:
    """A tiny random Llama (one layer, GQA, weights large enough for varied greedy tokens) with a
    Palu latent KV cache and rank-16 low-rank q/o/MLP projections that take a rank input."""
    lm = tiny_loaded("llama", seed=31, max_len=MAX_LEN, initializer_range=0.3, num_hidden_layers=1, **GQA)
    tg = trace(lm.model)
    mods = dict(lm.model.named_modules())
    facs = {}
    for name in lm.spec.linear_names():
        if name.endswith(("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")):
            U, S, Vh = torch.linalg.svd(mods[name].weight.detach(), full_matrices=False)
            facs[name] = Factors((U[:, :16] * S[:16]).contiguous(), Vh[:16].contiguous())
    LowRankLinearPass(facs, rank_input=True)(tg)
    LatentKVPass(exact_layers(lm, 2, rank=8), bits=bits, quant_group=8)(tg)
    plan = Plan(model=lm.spec.hf_config, source={"kind": "test"}, max_len=lm.model.max_len)
    plan.schedule = SCHEDULE
    cm = CompressedModel(graph=tg, plan=plan, spec=lm.spec, factors={}, dense_state={})
    export_onnx(cm, folder)
    return folder


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> Path:
    return _export(CASES[request.param], tmp_path_factory.mktemp(request.param) / "onnx")


def run_cpp(program: Path, *args: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(program), *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          check=False, env=env)


def cuda_library_env() -> dict:
    """The environment with the folders of the CUDA libraries that onnxruntime-gpu's CUDA provider loads
    (cuBLAS, cuDNN, the CUDA runtime) on the library path, as pip installs them beside torch: a program
    that is not Python does not get them from ``import torch``."""
    root = Path(torch.__file__).resolve().parent.parent / "nvidia"
    dirs = sorted({str(p.parent) for p in root.glob("**/lib/*.so*")})
    return {**os.environ, "LD_LIBRARY_PATH": os.pathsep.join(dirs + [os.environ.get("LD_LIBRARY_PATH", "")])}


def cpp_ids(program: Path, folder: Path, prompt: list[int], lib: Path | None) -> list[int]:
    args = [folder, "--prompt-ids", ",".join(map(str, prompt)), "--max-new-tokens", str(NEW_TOKENS)]
    args += ["--lib", lib] if lib is not None else ["--no-library"]
    res = run_cpp(program, *args)
    assert res.returncode == 0, f"lrexport_generate failed ({res.returncode}):\n{res.stderr}"
    lines = res.stdout.splitlines()
    assert len(lines) == 1, res.stdout
    return [int(t) for t in lines[0].split()]


def python_ids(folder: Path, prompts: list[list[int]], use_library: bool, schedule=True) -> list[list[int]]:
    """The Python runtime's greedy ids: the plan's schedule (unless ``schedule`` is given), the
    exported eos ids as stop ids."""
    backend, meta = load_onnx_backend(folder, use_library=use_library)
    if schedule is True:
        schedule = Plan.from_dict({k: v for k, v in meta.items() if k != "onnx"}).schedule
    return [generate(backend, [p], max_new_tokens=NEW_TOKENS, schedule=schedule,
                     stop_ids=meta["onnx"]["eos_token_ids"]).tokens[0] for p in prompts]


def test_cpp_matches_python_runtime(program, ops_lib, exported):
    meta = json.loads((exported / "lrexport.json").read_text())
    assert meta["onnx"]["rank_max"] and "ranks" in meta["onnx"]["inputs"]
    dtypes = {c["dtype"] for c in meta["onnx"]["cache"]}
    assert dtypes == ({"uint8", "float16"} if "4bit" in exported.parent.name else {"float32"})
    for use_library in (True, False):
        want = python_ids(exported, PROMPTS, use_library)
        for prompt, ids in zip(PROMPTS, want):
            got = cpp_ids(program, exported, prompt, ops_lib if use_library else None)
            assert got == ids, (use_library, prompt, got, ids)
    # with the library the kernel updates the IO-bound caches in place (no copy) at every call
    res = subprocess.run([str(program), str(exported), "--prompt-ids", "1,2,3", "--max-new-tokens", "3", "--lib",
                          str(ops_lib)], capture_output=True, text=True, timeout=60, check=False,
                         env={**os.environ, "LREXPORT_OPS_DEBUG": "1"})
    calls = [line for line in res.stderr.splitlines() if "LowRankKVAttention:" in line]
    assert res.returncode == 0 and len(calls) == 3, res.stderr  # 1 layer: prefill + 2 decode steps
    assert all("present_k aliases past_k, present_v aliases past_v" in line for line in calls), res.stderr
    # the schedule really acts: lowering the ranks at step 5 changes what is generated after it
    assert any(len(ids) > 6 for ids in want)
    assert python_ids(exported, PROMPTS, True, schedule=None) != want


def test_cpp_stops_at_eos(program, ops_lib, exported, tmp_path):
    """With eos_token_ids set to a token generated at step >= 7, both stop right after it."""
    prompt = PROMPTS[0]
    free = python_ids(exported, [prompt], True)[0]
    k = next(i for i, t in enumerate(free) if i >= 6 and t not in free[:i])
    folder = shutil.copytree(exported, tmp_path / "eos")
    meta = json.loads((folder / "lrexport.json").read_text())
    meta["onnx"]["eos_token_ids"] = [free[k]]
    (folder / "lrexport.json").write_text(json.dumps(meta))
    want = python_ids(folder, [prompt], True)[0]
    assert want == free[:k + 1]
    assert cpp_ids(program, folder, prompt, ops_lib) == want
    assert cpp_ids(program, folder, prompt, None) == python_ids(folder, [prompt], False)[0]


RANK_MAX = [1, 3, 5, 7, 8, 16, 33, 64, 100, 255, 4096]
SCHEDULES = {
    "none": None,
    "steps": SCHEDULE,
    "constant-ties": Schedule(form=Constant(0.5), min_rank=1),  # 1.5, 2.5, 3.5... round half to even
    "steps-align": Schedule(form=Steps(((0, 0.9), (3, 0.75), (6, 0.3))), min_rank=4, align=2, prefill=0.9),
    "linear": Schedule(form=Linear(start=1.0, end=0.2, steps=10), min_rank=3, align=4),
    "linear-1-step": Schedule(form=Linear(start=0.8, end=0.4, steps=1)),
    "cosine": Schedule(form=Cosine(start=0.95, end=0.35, steps=9), min_rank=2, prefill=0.5),
    "cosine-default": Schedule(form=Cosine()),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_cpp_schedule_ranks_match_python(program, tmp_path, name):
    sched = SCHEDULES[name]
    meta = {"schedule": config_to_dict(sched) if sched is not None else None,
            "onnx": {"inputs": [], "outputs": [], "cache": [], "rank_max": RANK_MAX, "max_len": MAX_LEN}}
    (tmp_path / "lrexport.json").write_text(json.dumps(meta))
    steps = 70
    res = run_cpp(program, tmp_path, "--print-ranks", steps)
    assert res.returncode == 0, res.stderr
    got = [[int(x) for x in line.split()] for line in res.stdout.splitlines()]
    want = [sched.ranks(t, RANK_MAX) if sched is not None else RANK_MAX for t in range(steps + 1)]
    assert got == want


def test_cpp_missing_folder(program, tmp_path):
    res = run_cpp(program, tmp_path / "nowhere", "--prompt-ids", "1,2,3")
    assert res.returncode != 0
    assert "does not exist" in res.stderr and "nowhere" in res.stderr
    assert res.stdout == ""


def _meta_folder(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "meta"
    folder.mkdir()
    (folder / "lrexport.json").write_text(text)
    return folder


@pytest.mark.parametrize("case", ["no-json", "bad-json", "no-onnx", "bad-schedule", "no-model", "usage"])
def test_cpp_errors(program, tmp_path, case):
    onnx = {"inputs": [], "outputs": [], "cache": [], "rank_max": [], "max_len": MAX_LEN}
    args: list = ["--prompt-ids", "1,2"]
    if case == "no-json":
        folder, message = tmp_path, "no lrexport.json"
    elif case == "bad-json":
        folder, message = _meta_folder(tmp_path, '{"onnx": {'), "not valid JSON"
    elif case == "no-onnx":
        folder, message = _meta_folder(tmp_path, '{"schedule": null}'), "no 'onnx' section"
    elif case == "bad-schedule":
        bad = {"type": "Schedule", "form": {"type": "Exponential"}, "min_rank": 8, "align": 1, "prefill": 1.0}
        folder = _meta_folder(tmp_path, json.dumps({"schedule": bad, "onnx": onnx}))
        message = "unknown schedule form 'Exponential'"
    elif case == "no-model":
        folder, message = _meta_folder(tmp_path, json.dumps({"schedule": None, "onnx": onnx})), "no model.onnx"
        args.append("--no-library")
    else:
        folder, message = tmp_path, "--prompt-ids: expected an integer, got 'x'"
        args = ["--prompt-ids", "1,x"]
    res = run_cpp(program, folder, *args)
    assert res.returncode != 0 and message in res.stderr, (res.returncode, res.stderr)
    assert "lrexport_generate: error:" in res.stderr and res.stdout == ""


def test_cpp_runtime_errors(program, exported, tmp_path):
    res = run_cpp(program, exported, "--prompt-ids", "1,2,3", "--max-new-tokens", MAX_LEN)
    assert res.returncode == 1 and f"needs {MAX_LEN + 3} positions" in res.stderr and f"max_len={MAX_LEN}" in res.stderr
    res = run_cpp(program, exported, "--prompt-ids", "1,2,3", "--lib", tmp_path / "nolib.so")
    assert res.returncode == 1 and "nolib.so does not exist" in res.stderr
    res = run_cpp(program, exported, "--prompt-ids", "1,500", "--no-library")
    assert res.returncode == 1 and "out of the vocabulary" in res.stderr
    res = run_cpp(program, exported, "--prompt-ids", "1,2", "--cuda", "--no-library")
    assert res.returncode == 2 and "--cuda keeps the caches in GPU memory" in res.stderr
    res = run_cpp(program, exported, "--prompt-ids", "1,2", "--cuda=-1")
    assert res.returncode == 2 and "--cuda: the device must be in [0, 1024]" in res.stderr


def test_cpp_cuda_or_says_why(program, ops_lib, exported):
    """``--cuda``: with onnxruntime-gpu and a GPU, the caches in GPU memory and the same greedy ids as the
    CPU run; with a CPU-only ONNX Runtime, an error naming the missing CUDA execution provider."""
    import onnxruntime as ort

    args = [exported, "--prompt-ids", ",".join(map(str, PROMPTS[0])), "--max-new-tokens", NEW_TOKENS, "--lib", ops_lib]
    res = run_cpp(program, *args, "--cuda", env=cuda_library_env())
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert res.returncode == 1 and "CUDA execution provider is not available" in res.stderr, res.stderr
        return
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == run_cpp(program, *args).stdout.split()


def test_python_sample_prints_the_same_ids(program, ops_lib, exported, capsys):
    sample = _module("lrexport_sample_generate", ROOT / "samples" / "python" / "generate.py")
    prompt = ",".join(map(str, PROMPTS[0]))
    assert sample.main([str(exported), "--prompt-ids", prompt, "--max-new-tokens", str(NEW_TOKENS)]) == 0
    printed = capsys.readouterr().out.split()
    assert [int(t) for t in printed] == cpp_ids(program, exported, PROMPTS[0], ops_lib)
