"""`neoxq finetune` on CPU: DeepSpeed (gloo, torch's AdamW, no compiled ops) with the real
network, full and LoRA, one rank and two, killed and resumed."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli.main import main
from models.loaders import load_model
from train.finetune import LOG_FILE, FinetuneConfig, Trainer, run, single_process_env

ROOT = Path(__file__).resolve().parents[2]


def _log(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / LOG_FILE).read_text().splitlines()]


def _probe() -> torch.Tensor:
    return torch.randint(1, 257, (2, 40), generator=torch.Generator().manual_seed(1))


def _config(byte_model: Path, shakespeare: tuple[Path, Path], out: Path, **kw) -> FinetuneConfig:
    base = dict(model=str(byte_model), train=str(shakespeare[0]),
                validation=str(shakespeare[1]), out=str(out), max_length=64, batch_size="4",
                learning_rate=3e-3, quiet=True, device="cpu")
    base.update(kw)
    return FinetuneConfig(**base)


# Not marked slow although it is: DeepSpeed leaves torch.distributed's default group set up
# in this process, so it must not be collected before the pipeline tests (tests/models),
# which set up their own; every xdist process runs its tests in collection order.
def test_full_zero2_lowers_validation_loss_and_saves_a_loadable_model(
    byte_model: Path, shakespeare: tuple[Path, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "full"
    cfg = _config(byte_model, shakespeare, out, method="full", zero_stage=2, max_steps=50,
                  log_every=25)
    with single_process_env():
        trainer = Trainer(cfg)
        before = trainer.evaluate()
        summary = trainer.train()
    log = _log(out)
    assert [r["step"] for r in log] == [25, 50]
    assert summary["zero_stage"] == 2 and summary["steps"] == 50
    assert log[-1]["val_loss"] < before - 1.0, (before, log)
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in log)

    # The output directory is a neoxq model whose logits are the trained module's.
    probe = _probe()
    trained = trainer.net.eval().dense_logits(probe)
    loaded = load_model(out).model.dense_logits(probe)
    torch.testing.assert_close(loaded, trained, rtol=0, atol=0)

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ROMEO:\nJULIET:\n")
    capsys.readouterr()
    assert main(["generate", str(out), "-i", str(prompts), "-o", str(tmp_path / "gen.jsonl"),
                 "--max-tokens", "8", "--temperature", "0", "--device", "cpu", "--quiet"]) == 0
    lines = [json.loads(ln) for ln in (tmp_path / "gen.jsonl").read_text().splitlines()]
    assert [ln["context"] for ln in lines] == ["ROMEO:", "JULIET:"]
    assert all(ln["length"] == 8 for ln in lines)
    assert main(["evaluate", str(out), "--tasks", "lambada", "--limit", "4", "--no-progress",
                 "--bootstrap-iters", "10", "-o", str(tmp_path / "eval.json")]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())


def test_lora_trains_only_the_adapter_and_merges_exactly(
    byte_model: Path, shakespeare: tuple[Path, Path], tmp_path: Path
) -> None:
    out = tmp_path / "lora"
    cfg = _config(byte_model, shakespeare, out, method="lora", lora_targets="all",
                  lora_rank=4, lora_alpha=8, lora_dropout=0.1, max_steps=6, log_every=3,
                  learning_rate=1e-2, save_model=False)
    with single_process_env():
        trainer = Trainer(cfg)
        start = {n: p.detach().clone() for n, p in trainer.net.named_parameters()}
        trainer.train()
        after = dict(trainer.net.named_parameters())
        for name, p0 in start.items():
            changed = not torch.equal(p0, after[name])
            assert changed == ("lora_" in name), name  # adapters move, nothing else does
        assert trainer.trainable == sum(p.numel() for n, p in start.items() if "lora_" in n)
        probe = _probe()
        with_adapter = trainer.net.eval().dense_logits(probe)
        qkv = trainer.net.layers["0"].attention.query_key_value
        expected_w = (qkv.base_layer.weight + qkv.lora_B["default"].weight
                      @ qkv.lora_A["default"].weight * (8 / 4)).detach()
        trainer.save_model()

    merged = load_model(out).model
    torch.testing.assert_close(merged.dense_logits(probe), with_adapter, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged.layers["0"].attention.query_key_value.weight, expected_w)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in n for n in adapter)
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8


def test_two_data_parallel_ranks_equal_one(
    byte_model: Path, shakespeare: tuple[Path, Path], tmp_path: Path
) -> None:
    """Same global batch (4 rows): 1 rank x 4 accumulation vs 2 ranks x 2, ZeRO-2."""
    common = ["--method", "full", "--zero-stage", "2", "--max-steps", "5", "--max-length",
              "64", "--batch-size", "4", "--micro-batch-size", "1", "--learning-rate", "3e-3",
              "--log-every", "1", "--device", "cpu", "--quiet",
              "--train", str(shakespeare[0])]
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["finetune", str(byte_model), "--out", str(one), *common]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "cli.main", "finetune", str(byte_model),
                           "--out", str(two), "--gpus", "2", *common],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s1, s2 = json.loads((one / "finetune.json").read_text()), json.loads(
        (two / "finetune.json").read_text())
    assert (s1["ranks"], s1["gradient_accumulation"]) == (1, 4)
    assert (s2["ranks"], s2["gradient_accumulation"]) == (2, 2)
    l1, l2 = [r["train_loss"] for r in _log(one)], [r["train_loss"] for r in _log(two)]
    assert len(l1) == len(l2) == 5
    assert l1 == pytest.approx(l2, rel=1e-5, abs=1e-5)
    m1, m2 = load_model(one).model, load_model(two).model
    for (name, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_killed_run_resumes_on_the_same_loss_curve(
    byte_model: Path, shakespeare: tuple[Path, Path], tmp_path: Path
) -> None:
    args = ["--method", "full", "--zero-stage", "2", "--max-steps", "10", "--max-length", "64",
            "--batch-size", "4", "--learning-rate", "3e-3", "--log-every", "1",
            "--save-every", "5", "--device", "cpu", "--quiet", "--train", str(shakespeare[0])]
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert main(["finetune", str(byte_model), "--out", str(ref), *args]) == 0

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "finetune", str(byte_model),
                             "--out", str(killed), *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = killed / "checkpoints" / "latest"
    deadline = time.monotonic() + 300
    while not latest.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert latest.read_text().strip() == "step5"
    assert not (killed / "neoxq_config.json").exists()  # no final model from a killed run

    # Without --resume the old checkpoints are not silently overwritten.
    assert main(["finetune", str(byte_model), "--out", str(killed), *args]) == 1
    assert main(["finetune", str(byte_model), "--out", str(killed), "--resume", *args]) == 0
    want = {r["step"]: r["train_loss"] for r in _log(ref)}
    got = {r["step"]: r["train_loss"] for r in _log(killed)}
    assert sorted(got) == list(range(1, 11))  # the killed run's lines past step 5 dropped
    for step in range(6, 11):
        assert got[step] == pytest.approx(want[step], rel=1e-6), step
    a, b = load_model(ref).model, load_model(killed).model
    for (name, x), (_, y) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        torch.testing.assert_close(x, y, msg=name)


def test_cli_refuses_bad_options_and_files(byte_model: Path, tmp_path: Path, capsys) -> None:
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    out = str(tmp_path / "out")
    assert main(["finetune", str(byte_model), "--train", str(good), "--out", out,
                 "--method", "qlora"]) == 2
    assert "method: expected one of lora, full, got 'qlora'" in capsys.readouterr().err
    assert main(["finetune", str(byte_model), "--train", str(good), "--out", out,
                 "--method", "lora", "--lora-targets", "mlp"]) == 2
    assert "lora targets" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n"
                   + json.dumps({"prompt": "a"}) + "\n")
    assert main(["finetune", str(byte_model), "--train", str(bad), "--out", out,
                 "--device", "cpu", "--quiet"]) == 1
    assert "bad.jsonl:2: field 'completion': missing" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["finetune", str(byte_model), "--train", str(empty), "--out", out,
                 "--device", "cpu", "--quiet"]) == 1
    assert "empty" in capsys.readouterr().err
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "a", "completion": "b" * 300}) + "\n")
    assert main(["finetune", str(byte_model), "--train", str(long), "--out", out,
                 "--device", "cpu", "--quiet", "--max-length", "64"]) == 1
    assert "long.jsonl:1: 302 tokens, longer than max_length 64" in capsys.readouterr().err
    assert main(["finetune", str(byte_model), "--train", str(long), "--out", out,
                 "--device", "cpu", "--quiet", "--max-length", "512"]) == 1
    assert "exceeds the model's context (256 positions)" in capsys.readouterr().err
    assert main(["finetune", str(byte_model), "--train", str(good), "--out", out,
                 "--device", "cpu", "--quiet", "--dtype", "bfloat16", "--zero-stage", "0"]) == 1
    assert "use --zero-stage 1 or more" in capsys.readouterr().err
    # every command's dtype names: bf16 is bfloat16 here too
    assert main(["finetune", str(byte_model), "--train", str(good), "--out", out,
                 "--device", "cpu", "--quiet", "--dtype", "bf16", "--zero-stage", "0"]) == 1
    assert "ZeRO stage 0 trains torch.bfloat16" in capsys.readouterr().err


def test_run_in_process_from_a_config(byte_model: Path, tmp_path: Path) -> None:
    """Prompt/completion data through `run`: the API that `python -m train.finetune` uses."""
    f = tmp_path / "pc.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"}) + "\n"
                         for i in range(40)))
    summary = run(FinetuneConfig(model=str(byte_model), train=str(f), out=str(tmp_path / "o"),
                                 max_length=64, batch_size="8", max_steps=3, log_every=1,
                                 device="cpu", quiet=True))
    assert summary["train_format"] == "prompt_completion" and summary["train_documents"] == 40
    assert summary["train_rows"] < 40  # packed: several examples per row
    assert (tmp_path / "o" / "adapter" / "adapter_config.json").exists()


def test_lora_resume_restores_adapter_optimizer_and_dropout(
    byte_model: Path, shakespeare: tuple[Path, Path], tmp_path: Path
) -> None:
    """A LoRA checkpoint holds only the adapter (plus optimizer and schedule); with
    dropout on, the resumed steps still equal the uninterrupted run's."""
    kw = dict(method="lora", lora_targets="all", lora_dropout=0.2, max_steps=6, log_every=1,
              save_every=3, learning_rate=1e-2, save_model=False, validation=None)
    with single_process_env():
        ref = Trainer(_config(byte_model, shakespeare, tmp_path / "ref", **kw))
        want = [ref.train_step()["loss"] for _ in range(6)]

        cut = Trainer(_config(byte_model, shakespeare, tmp_path / "cut", **kw))
        for _ in range(3):
            cut.train_step()
        cut.save_checkpoint()  # then the process "dies": nothing else is written
        states = torch.load(tmp_path / "cut" / "checkpoints" / "step3"
                            / "mp_rank_00_model_states.pt", weights_only=False)
        saved = set(states["module"])
        assert saved and all("lora_" in n for n in saved)  # the frozen base is left out

        resumed = Trainer(_config(byte_model, shakespeare, tmp_path / "cut", resume=True, **kw))
        assert resumed.resume() and resumed.step == 3
        got = [resumed.train_step()["loss"] for _ in range(3)]
    assert got == pytest.approx(want[3:], rel=1e-6)
    assert want[3:] != pytest.approx(want[:3], rel=1e-3)  # the steps do differ


def test_wandb_offline_logging(byte_model: Path, shakespeare: tuple[Path, Path],
                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--wandb with WANDB_MODE=offline: no network, a local run under OUT/wandb."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    run(_config(byte_model, shakespeare, out, max_steps=2, log_every=1, validation=None,
                wandb_project="neoxq-test"))
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    data = list(runs[0].glob("run-*.wandb"))
    assert data and data[0].stat().st_size > 0


def test_zero_stages_and_offload_take_the_same_steps(
    byte_model: Path, shakespeare: tuple[Path, Path], tmp_path: Path
) -> None:
    """ZeRO 1, 2 and 3, with and without optimizer offload, are one optimizer on one
    rank: the same losses step for step, and a ZeRO-3 run (its weights partitioned)
    still writes the whole trained network."""
    import deepspeed

    kw = dict(method="full", max_steps=3, log_every=1, validation=None)
    probe = _probe()
    losses, logits = {}, {}
    with single_process_env():
        for stage, offload in ((2, False), (1, False), (3, False), (2, True), (3, True)):
            out = tmp_path / f"z{stage}{'o' if offload else ''}"
            trainer = Trainer(_config(byte_model, shakespeare, out, zero_stage=stage,
                                      offload=offload, **kw))
            assert trainer.engine.zero_optimization_stage() == stage
            assert bool(trainer.engine.zero_cpu_offload()) == offload
            trainer.train()
            losses[stage, offload] = [r["train_loss"] for r in _log(out)]
            params = list(trainer.net.parameters())
            gather = (deepspeed.zero.GatheredParameters(params) if stage == 3
                      else contextlib.nullcontext())
            with gather, torch.no_grad():
                logits[stage, offload] = trainer.net.eval().dense_logits(probe)
            torch.testing.assert_close(load_model(out).model.dense_logits(probe),
                                       logits[stage, offload], rtol=0, atol=0)
    want = losses[2, False]
    assert len(want) == 3 and want[-1] < want[0]
    for key, got in losses.items():
        assert got == pytest.approx(want, rel=1e-5), key
        torch.testing.assert_close(logits[key], logits[2, False], rtol=1e-4, atol=1e-4,
                                   msg=str(key))


def test_lora_under_zero3_merges_the_partitioned_adapter(
    byte_model: Path, shakespeare: tuple[Path, Path], tmp_path: Path
) -> None:
    import deepspeed

    out = tmp_path / "lora3"
    cfg = _config(byte_model, shakespeare, out, method="lora", lora_targets="all",
                  zero_stage=3, max_steps=3, log_every=1, learning_rate=1e-2,
                  validation=None, save_model=False)
    probe = _probe()
    with single_process_env():
        trainer = Trainer(cfg)
        trainer.train()
        with deepspeed.zero.GatheredParameters(list(trainer.net.parameters())), \
                torch.no_grad():
            with_adapter = trainer.net.eval().dense_logits(probe)
        trainer.save_model()
    base = load_model(byte_model).model.dense_logits(probe)
    assert (with_adapter - base).abs().max() > 1e-2  # the adapter did train
    torch.testing.assert_close(load_model(out).model.dense_logits(probe), with_adapter,
                               rtol=1e-5, atol=1e-5)
    assert (out / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("kind", ["preset", "hf", "neox-yaml"])
def test_finetune_takes_every_model_kind(kind: str, tokenizer_path: Path,
                                         tmp_path: Path, capsys) -> None:
    """MODEL is anything the loaders take: a preset, an HF directory, a GPT-NeoX YAML (a
    neoxq directory is the other tests' byte model). The result is a neoxq directory
    whose weights are the trained ones, with the source's tokenizer beside them."""
    from models.config import pad_vocab
    from models.loaders import load_spec_tokenizer
    from tests.models.hf_fixtures import VARIANTS, hf_model, write_hf_dir, write_neox_checkpoint

    if kind == "preset":
        spec = "preset:tiny"
    else:
        hf = hf_model(dict(VARIANTS["parallel-rot25"], vocab_size=pad_vocab(50277, 256)))
        spec = str(write_hf_dir(hf, tmp_path / "hf", tokenizer_path) if kind == "hf"
                   else write_neox_checkpoint(hf, tmp_path / "neox", tokenizer_path, tp=2))
    data = tmp_path / "pc.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}"})
                            + "\n" for i in range(16)))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["finetune", spec, "--train", str(data), "--out", str(out), "--method", "full",
                 "--max-steps", "2", "--max-length", "32", "--batch-size", "4",
                 "--learning-rate", "1e-2", "--device", "cpu", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["steps"] == 2
    probe = torch.randint(1, 300, (1, 12), generator=torch.Generator().manual_seed(0))
    before = load_model(spec).model.dense_logits(probe)
    after = load_model(out)
    assert (after.model.dense_logits(probe) - before).abs().max() > 1e-3  # trained
    want = load_spec_tokenizer(spec)
    assert after.tokenizer.encode("1 + 1 = 2") == want.encode("1 + 1 = 2")


def test_progress_bar_and_log_lines(byte_model: Path, shakespeare: tuple[Path, Path],
                                    tmp_path: Path, capsys) -> None:
    """The bar shows loss, tokens/s and the time left; each log line carries step, train and
    validation loss, learning rate, tokens/s and MFU (here against --peak-tflops)."""
    out = tmp_path / "p"
    with single_process_env():
        trainer = Trainer(_config(byte_model, shakespeare, out, max_steps=4, log_every=2,
                                  quiet=False, peak_tflops=0.5))
        capsys.readouterr()
        trainer.train()
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "4/4" in bar and "loss=" in bar and "tok_s=" in bar and "<00:00" in bar, bar
    log = _log(out)
    assert [r["step"] for r in log] == [2, 4]
    for r in log:
        assert {"step", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu"} <= set(r)
        assert r["val_loss"] > 0 and r["lr"] > 0
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * trainer.flops_per_token / 0.5e12)


def test_a_process_group_starts_past_a_stale_build_lock(tmp_path: Path) -> None:
    """A rank on the CPU starts its process group without building DeepSpeed's
    shared-memory op: a build lock left by a killed build (which would make the build
    wait forever) does not stop it, and nothing is compiled."""
    ext = tmp_path / "torch_extensions"
    (ext / "deepspeed_shm_comm").mkdir(parents=True)
    (ext / "deepspeed_shm_comm" / "lock").touch()
    code = ("import deepspeed, torch.distributed as dist\n"
            "from train.finetune import single_process_env, skip_shm_comm_build\n"
            "with single_process_env():\n"
            "    skip_shm_comm_build()\n"
            "    deepspeed.init_distributed(dist_backend='gloo')\n"
            "    assert dist.get_world_size() == 1\n"
            "print('started')\n")
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(ext), "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, timeout=120,
                         capture_output=True, text=True)
    assert out.returncode == 0 and "started" in out.stdout, out.stderr[-2000:]
    assert sorted(p.name for p in (ext / "deepspeed_shm_comm").iterdir()) == ["lock"]
