"""The CLI end to end on a tiny model folder, and its error messages."""

from __future__ import annotations

import json

import onnx
import pytest

from lrexport import api
from lrexport.cli import main, parse_schedule, parse_targets
from lrexport.errors import ConfigError
from lrexport.schedule import Cosine, Steps
from tests.tiny import tiny_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


def test_compress_inspect_generate_eval(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LREXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cm"
    rc = main(["compress", "--model", str(folder), "--ratio", "0.3", "--alloc", "flrc", "--schedule",
               "linear:1.0:0.5:8", "--calib-windows", "4", "--calib-window", "32", "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "lowrank_linear: changed" in text and "saved" in text
    plan = json.loads((out / "lrexport.json").read_text())
    assert plan["format"] == "lrexport-plan" and plan["weights"]["allocation"]["type"] == "Flrc"
    assert abs(plan["weights"]["params_kept"] / plan["weights"]["params_total"] - 0.7) < 0.005
    assert list((tmp_path / "cache" / "calib").glob("*.safetensors"))  # statistics were cached
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    rc = main(["inspect", str(out), "--png", str(tmp_path / "ranks.png")])
    assert rc == 0 and (tmp_path / "ranks.png").stat().st_size > 1000
    assert "Flrc" in capsys.readouterr().out
    rc = main(["generate", str(out), "--prompt", "The game", "--prompt", "A", "--max-new-tokens", "5"])
    assert rc == 0
    # the compressed folder and the API agree on the generated text
    texts, res = api.generate_text(model=str(out), prompts=["The game", "A"], max_new_tokens=5)
    printed = capsys.readouterr().out
    assert all(t in printed for t in texts) and res.avg_active_params < 0.7


def test_cli_errors(folder, tmp_path, capsys):
    base = ["compress", "--model", str(folder), "--out", str(tmp_path / "x"), "--calib-windows", "2",
            "--calib-window", "16"]
    assert main(base + ["--ratio", "1.5"]) == 2
    assert "ratio must be in (0, 1)" in capsys.readouterr().err
    assert main(base + ["--ratio", "0.2", "--calib", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt does not exist" in capsys.readouterr().err
    assert main(["compress", "--model", str(tmp_path / "nope"), "--ratio", "0.2", "--out", "x"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert main(base + ["--ratio", "0.2", "--schedule", "zigzag:1"]) == 2
    assert "unknown schedule 'zigzag'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(base + ["--ratio", "0.2", "--method", "magic"])
    assert "invalid choice: 'magic'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_compress_targets(folder, tmp_path, capsys, monkeypatch):
    """``--targets mlp`` factorizes only the MLP's projections, and ``--ratio`` removes that fraction of
    their parameters; an unknown name is an error that lists the known ones and writes nothing."""
    monkeypatch.setenv("LREXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "mlp"
    rc = main(["compress", "--model", str(folder), "--ratio", "0.3", "--alloc", "uniform", "--targets", "mlp",
               "--calib-windows", "2", "--calib-window", "16", "--out", str(out)])
    assert rc == 0
    w = json.loads((out / "lrexport.json").read_text())["weights"]
    kinds = {n.rsplit(".", 1)[1] for n in w["ranks"]}
    assert kinds == {"gate_proj", "up_proj", "down_proj"}, kinds
    assert 0.65 < w["params_kept"] / w["params_total"] <= 0.7  # whole ranks: 26 per projection here (0.677)
    capsys.readouterr()
    assert main(["compress", "--model", str(folder), "--ratio", "0.3", "--targets", "q,ffn", "--out",
                 str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "unknown projection 'ffn'" in err and "gate" in err and "mlp" in err
    assert not (tmp_path / "bad").exists()
    assert parse_targets("o, q_proj,mlp") == ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert parse_targets("attn") == ("q_proj", "k_proj", "v_proj", "o_proj")


def test_parse_schedule():
    s = parse_schedule("cosine:1.0:0.6:32")
    assert isinstance(s.form, Cosine) and s.form.steps == 32
    s = parse_schedule("steps:1=1.0,16=0.8")
    assert isinstance(s.form, Steps) and s.form.points == ((1, 1.0), (16, 0.8))
    assert parse_schedule("none") is None
    with pytest.raises(ConfigError, match="linear:1.0:0.6:64"):
        parse_schedule("linear:1.0")
    with pytest.raises(ConfigError, match="start must be in"):
        parse_schedule("linear:0:0.5:4")


def test_unsupported_architecture_folder(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    cfg = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    assert main(["compress", "--model", str(tmp_path / "m"), "--ratio", "0.2", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "gpt2" in err and "LlamaForCausalLM" in err



def test_compress_weights_and_kv_together_round_trip(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LREXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "both"
    rc = main(["compress", "--model", str(folder), "--ratio", "0.2", "--kv-ratio", "0.5", "--kv-group", "0",
               "--kv-bits", "4", "--kv-quant-group", "8", "--calib-windows", "4", "--calib-window", "32",
               "--out", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "latent_kv: changed 2 place(s)" in text and "J-LRD" in text
    plan = json.loads((out / "lrexport.json").read_text())
    assert plan["kv"]["bits"] == 4 and abs(plan["kv"]["kv_removed"] - 0.5) < 0.01
    assert not any(n.endswith(("k_proj", "v_proj")) for n in plan["weights"]["ranks"])
    cm = api.open_model(out)
    assert cm.graph.cache.dtypes[:2] == ["uint8", "float16"]
    texts, res = api.generate_text(model=cm, prompts=["The game"], max_new_tokens=6)
    again, res2 = api.generate_text(model=str(out), prompts=["The game"], max_new_tokens=6)
    assert res.tokens == res2.tokens
    assert main(["compress", "--model", str(folder), "--out", str(tmp_path / "none")]) == 2
    assert "nothing to do" in capsys.readouterr().err
    # export: --fuse-matmuls joins q's first factor with the key / value latents and gate's with up's (2 Splits
    # per layer), --no-fuse-matmuls keeps one MatMul per projection; the default fuses float16 models only. All
    # folders generate.
    f16 = None
    for flags, fused in ((["--no-fuse-matmuls"], False), (["--fuse-matmuls"], True), ([], None)):
        dst = tmp_path / ("onnx" + "".join(flags))
        assert main(["export", str(out), "--out", str(dst), *flags]) == 0
        graph = onnx.load(str(dst / "model.onnx"), load_external_data=False).graph
        if f16 is None:
            f16 = any(t.data_type == onnx.TensorProto.FLOAT16 for t in graph.initializer)
        fused = f16 if fused is None else fused
        assert ("shared_input_matmuls" in capsys.readouterr().out) == fused
        assert [n.op_type for n in graph.node].count("Split") == (2 * cm.spec.num_layers if fused else 0)
        _, gen = api.generate_text(model=str(dst), prompts=["The game"], max_new_tokens=6)
        assert 1 <= len(gen.tokens[0]) <= 6  # the stop token may end it early
    # --cuda-graph: the attention reads past_len in device memory (LowRankKVAttentionDeviceLen); on the CPU the
    # folder generates the same tokens as the default export
    dst = tmp_path / "onnx-graph"
    assert main(["export", str(out), "--out", str(dst), "--cuda-graph"]) == 0
    assert "device_lengths" in capsys.readouterr().out
    ops = [n.op_type for n in onnx.load(str(dst / "model.onnx"), load_external_data=False).graph.node]
    assert ops.count("LowRankKVAttentionDeviceLen") == cm.spec.num_layers and "LowRankKVAttention" not in ops
    _, g1 = api.generate_text(model=str(dst), prompts=["The game"], max_new_tokens=6)
    _, g0 = api.generate_text(model=str(tmp_path / "onnx"), prompts=["The game"], max_new_tokens=6)
    assert g1.tokens == g0.tokens
    capsys.readouterr()
    # generate --cuda-graph asks for graphs: on the CPU, an error that names the CUDA provider; --no-cuda-graph runs
    assert main(["generate", str(dst), "--prompt", "The game", "--max-new-tokens", "2", "--cuda-graph"]) == 2
    assert "CUDAExecutionProvider" in capsys.readouterr().err
    assert main(["generate", str(dst), "--prompt", "The game", "--max-new-tokens", "2", "--no-cuda-graph"]) == 0


def test_eval_command_on_a_compressed_folder(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LREXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "cm"
    assert main(["compress", "--model", str(folder), "--ratio", "0.3", "--calib-windows", "2", "--calib-window", "16",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    rc = main(["eval", str(out), "--ppl-window", "32", "--ppl-windows", "2", "--xsum", "2", "--zeroshot",
               "arc_easy,piqa", "--zeroshot-limit", "4", "--json", str(tmp_path / "r.json")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "wikitext-2 perplexity" in text and "xsum rouge-L" in text and "arc_easy" in text
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["ppl"]["windows"] == 2 and res["ppl"]["ppl"] > 1
    assert res["zeroshot"]["piqa"]["n"] == 4 and 0 <= res["xsum"]["rougeL"] <= 1
    assert main(["eval", str(out), "--zeroshot", "nosuchtask", "--no-ppl"]) == 2
    assert "nosuchtask" in capsys.readouterr().err


def test_compress_progressive_solves_the_schedule_for_the_average(folder, tmp_path, capsys, monkeypatch):
    from lrexport.runtime.loop import generate

    monkeypatch.setenv("LREXPORT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "prog"
    # a small margin: on this tiny model most projections stay dense, so little can be decayed
    rc = main(["compress", "--model", str(folder), "--ratio", "0.3", "--progressive", "cosine:0.1:8",
               "--calib-windows", "4", "--calib-window", "32", "--out", str(out)])
    assert rc == 0
    assert "progressive schedule: cosine 1->" in capsys.readouterr().out
    cm = api.open_model(out)
    w = cm.plan.weights
    assert abs(w.params_kept / w.params_total - (1 - 0.3 * 0.9)) < 0.005  # stored for 0.3 * (1 - 0.1)
    assert isinstance(cm.plan.schedule.form, Cosine) and cm.plan.schedule.form.end < 1
    # 9 new tokens = 8 decode steps, the generation length the schedule was solved for
    res = generate(cm.backend(), [[1, 2, 3]], max_new_tokens=9, schedule=cm.plan.schedule)
    assert len(res.active_fractions) == 8
    assert 0.7 - 1e-9 <= res.avg_active_params < 0.72
    assert main(["compress", "--model", str(folder), "--ratio", "0.3", "--progressive", "cosine",
                 "--schedule", "linear:1:0.5:8", "--out", str(tmp_path / "x")]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["compress", "--model", str(folder), "--ratio", "0.3", "--progressive", "steps",
                 "--out", str(tmp_path / "x")]) == 2
    assert "'linear' or 'cosine'" in capsys.readouterr().err
    assert main(["compress", "--model", str(folder), "--ratio", "0.3", "--progressive", "cosine:x",
                 "--out", str(tmp_path / "x")]) == 2
    assert "FORM[:MARGIN[:TOKENS]]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
