"""The GPU path, checked on the CPU: the measurement script end to end on a tiny model, the predictions it compares
(activations in bf16 and with DoRA, step FLOPs against torch's counter, optimizer bytes in torch's and bitsandbytes'
layouts), the pieces that make it travel (the cache keyword of transformers 5.17-5.24, random weights from a config-only
folder with QLoRA, the bundle's stripped wheel, the weights' halves), and the pins for Python 3.12 and 3.13."""

from __future__ import annotations

import copy
import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lorakit import fast, finetune
from lorakit.data import task_splits
from lorakit.fast import cache_hidden_states, cached_loss
from lorakit.memory import measure_training_state, predict_training_state
from lorakit.models import prepare_smollm2
from lorakit.train import StepTimer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu  # noqa: E402
import gpu_bundle  # noqa: E402

TOP_K = 2


def tiny_config(tokenizer) -> LlamaConfig:
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(prepare_smollm2())


def tiny_setup(tokenizer, dtype, method="lora"):
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config(tokenizer)).to(dtype).eval().requires_grad_(False)
    train = cache_hidden_states(model, tokenizer, task_splits(16, 0, 1, seed=0)["train"], top_k=TOP_K,
                                share_prefix=True, progress=False)
    texts = ["The cat sat on the mat and looked at the door.", "What is the capital of France?",
             "A longer sentence about warehouses, carriers and the policies that govern damaged parcels."]
    replay = finetune.cache_texts(model, tokenizer, texts, top_k=TOP_K, max_length=16, progress=False)
    settings = finetune.Settings(top_k=TOP_K, r=4, alpha=8, method=method, device="cpu", dtype=dtype)
    peft_model = finetune.add_adapter(model, settings)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.02)
    return peft_model, train, replay


# --- the cache keyword ------------------------------------------------------------------------------------------


def test_cache_keyword_is_read_from_the_layer_signature():
    class New(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, cache=None, **kwargs):
            return hidden_states

    class Old(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, past_key_values=None, **kwargs):
            return hidden_states

    class Neither(torch.nn.Module):
        def forward(self, hidden_states, **kwargs):
            return hidden_states

    assert fast._cache_keyword(New) == "cache"
    assert fast._cache_keyword(Old) == "past_key_values"
    with pytest.raises(TypeError, match="neither `cache` nor `past_key_values`"):
        fast._cache_keyword(Neither)
    # the installed transformers' Llama layer (5.24: `cache`, behind a deprecation wrapper for the old name)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    assert fast._cache_keyword(LlamaDecoderLayer) in ("cache", "past_key_values")


def test_a_layer_that_drops_the_cache_is_an_error_not_a_silent_wrong_answer(tokenizer):
    peft_model, train, _ = tiny_setup(tokenizer, torch.float32)
    decoder = finetune._parts(peft_model)[1]
    layer_type = type(decoder.layers[0])
    keyword = fast._cache_keyword(layer_type)
    original = layer_type.forward

    def dropping(self, *args, **kwargs):
        kwargs.pop(keyword, None)  # as a version that takes the cache under another name would
        return original(self, *args, **kwargs)

    layer_type.forward = dropping
    try:
        with pytest.raises(RuntimeError, match="never took the shared prefix"):
            cached_loss(peft_model, train, [0, 1, 2], share_prefix=True)
    finally:
        layer_type.forward = original


# --- the predictions the GPU script compares ---------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_activation_prediction_per_dtype_and_method(tokenizer, dtype, method):
    peft_model, train, replay = tiny_setup(tokenizer, dtype, method)
    idx, ridx = [0, 1, 2, 3], [0, 2]

    def loss_fn(m, _b):
        return cached_loss(m, train, idx, share_prefix=True) + finetune.kl_to_base(m, replay, ridx)

    measured = measure_training_state(peft_model, {}, loss_fn=loss_fn)
    width, p = train.width(idx), train.prefix_len
    acts = finetune.predict_activation_bytes(
        peft_model, TOP_K, ticket_tokens=p + len(idx) * (width - p), prefix_kv_tokens=len(idx) * p,
        answer_tokens=int((train.labels[idx, 1:width] != -100).sum()), replay_tokens=len(ridx) * replay.width(ridx),
        replay_positions=replay.tokens(ridx) - len(ridx))
    assert 0.9 < acts["total"] / measured.activations < 1.1, (acts, measured.activations)
    assert ("DoRA weight temporaries (transient)" in acts) == (method == "dora")


@pytest.mark.parametrize("share_prefix", [True, False])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_step_flops_are_torch_counters_within_5_percent(tokenizer, method, share_prefix):
    peft_model, train, replay = tiny_setup(tokenizer, torch.float32, method)
    idx, ridx = [0, 1, 2, 3], [0, 2]
    peft_model.train()

    def step():
        (cached_loss(peft_model, train, idx, share_prefix=share_prefix)
         + finetune.kl_to_base(peft_model, replay, ridx)).backward()

    counted = finetune.count_flops(step)
    formula = finetune.step_flops(peft_model, train, idx, replay, ridx, share_prefix=share_prefix)
    assert formula["total"] == formula["tickets"] + formula["replay"] + formula["head"]
    assert 0.95 < formula["total"] / counted < 1.05, (formula, counted)
    # attention counts in too: the counter sees the CPU's attention kernel (registered by count_flops)
    without_attention = finetune.count_flops(lambda: None)
    assert without_attention == 0


@pytest.mark.parametrize("optimizer", [torch.optim.AdamW, bnb.optim.AdamW, bnb.optim.PagedAdamW],
                         ids=lambda o: f"{o.__module__.split('.')[0]}.{o.__name__}")
def test_optimizer_bytes_predicted_equal_measured_in_both_layouts(tokenizer, optimizer):
    peft_model, train, _ = tiny_setup(tokenizer, torch.bfloat16)
    predicted = predict_training_state(peft_model, optimizer=optimizer)
    measured = measure_training_state(peft_model, {}, optimizer_factory=optimizer,
                                      loss_fn=lambda m, _b: cached_loss(m, train, [0, 1]))
    assert (predicted.gradients, predicted.optimizer) == (measured.gradients, measured.optimizer)
    assert predicted.paged_optimizer == measured.paged_optimizer == 0  # bitsandbytes pages only on CUDA
    if optimizer is not torch.optim.AdamW:  # fp32 states for bf16 parameters, and no step tensor
        assert "step" not in measured.optimizer
        assert measured.optimizer["state1"] == 4 * sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def test_cuda_optimizer_falls_back_to_torch_saying_why(monkeypatch):
    monkeypatch.setattr(finetune, "_bitsandbytes_cuda_problem", lambda: "OSError: libbitsandbytes_cuda130.so")
    assert finetune.optimizer_factory("cuda") is torch.optim.AdamW
    assert "unavailable: OSError: libbitsandbytes_cuda130.so" in finetune.optimizer_name("cuda")
    monkeypatch.setattr(finetune, "_bitsandbytes_cuda_problem", lambda: None)
    assert finetune.optimizer_factory("cuda") is bnb.optim.PagedAdamW
    assert finetune.optimizer_factory("cpu") is torch.optim.AdamW


def test_adapters_disabled_is_peft_disable_adapter(tokenizer):
    peft_model, _, _ = tiny_setup(tokenizer, torch.float32, "dora")
    x = torch.randint(0, 1000, (2, 9))
    grads = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    with torch.no_grad():
        on = peft_model(input_ids=x).logits
        with peft_model.disable_adapter():
            reference = peft_model(input_ids=x).logits
        with finetune.adapters_disabled(peft_model):
            off = peft_model(input_ids=x).logits
        again = peft_model(input_ids=x).logits
    assert torch.equal(off, reference) and torch.equal(again, on) and not torch.equal(on, off)
    assert grads == {n: p.requires_grad for n, p in peft_model.named_parameters()}


# --- timing without reading back ------------------------------------------------------------------------------------


def test_step_timer_leaves_out_the_warmup():
    timer = StepTimer("cpu", warmup=2)
    for _ in range(5):
        timer.start()
        timer.stop()
    assert len(timer.milliseconds()) == 3 and timer.seconds() >= 0
    with pytest.raises(ValueError):
        StepTimer("cpu", warmup=-1)


def test_train_guarded_warmup_counts_and_reads_losses_once(tokenizer, monkeypatch):
    peft_model, train, replay = tiny_setup(tokenizer, torch.float32)
    reference = finetune.train_guarded(copy.deepcopy(peft_model), train, 5, replay=replay, batch_size=4,
                                       progress=False)
    reads = {"item": 0, "tolist": 0}  # lorakit's own reads of a tensor's value (torch's AdamW reads its CPU step)
    originals = {name: getattr(torch.Tensor, name) for name in reads}

    def counting(name):
        def read(self, *args):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("lorakit"):
                reads[name] += 1
            return originals[name](self, *args)
        return read

    for name in reads:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    run = finetune.train_guarded(peft_model, train, 5, replay=replay, batch_size=4, progress=False, warmup=2)
    assert reads == {"item": 0, "tolist": 3}  # the three loss lists, read once each at the end, none step by step
    assert run["loss"] == reference["loss"] and run["task_loss"] == reference["task_loss"]
    assert len(run["step_ms"]) == len(run["batches"]) == 3
    counted = sum(sum(train.lengths()[i] for i in idx) + replay.tokens(r) for idx, r in run["batches"])
    assert run["tokens"] == counted < reference["tokens"]
    with pytest.raises(ValueError):
        finetune.train_guarded(peft_model, train, 3, batch_size=4, warmup=3, progress=False)


# --- the measurement script and its bundle ---------------------------------------------------------------------


def test_gpu_script_runs_end_to_end_on_a_tiny_model(tmp_path):
    # the whole path on the CPU, every part and configuration; the timeout guards against a hang (it takes ~20 s)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--tiny", "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    parts = json.loads((tmp_path / "gpu.json").read_text())["parts"]
    assert not [name for name, part in parts.items() if isinstance(part, dict) and "error" in part], parts
    assert parts["bitsandbytes"]["nf4_bytes_equal_lorakit"] is True
    steps = {name: part for name, part in parts.items() if name.startswith("step: ")}
    assert sorted(steps) == ["step: dora batch 4", "step: lora batch 4", "step: qlora batch 4"]
    for name, row in steps.items():
        assert 0.9 < row["activations_predicted_mb"] / row["activations_measured_mb"] < 1.1, name
        assert row["optimizer_predicted"] == row["optimizer_measured"] and row["gradients_predicted_equal_measured"]
        assert row["timed_steps"] == 3 and row["tokens_per_s"] > 0
        if row["method"] != "qlora":  # bitsandbytes' CPU 4-bit product is invisible to torch's counter
            assert 0.95 < row["flops_formula_over_counter"] < 1.05, name
    assert parts["RESULT"].startswith("RESULT method=lora batch=4 ")
    assert "| dora | 4 |" in (tmp_path / "gpu.md").read_text()


def test_random_weights_qlora_from_a_config_only_folder(tmp_path, tokenizer):
    folder = tmp_path / "config-only"
    tiny_config(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert not list(folder.glob("*.safetensors"))
    settings = finetune.Settings(model=str(folder), method="qlora", top_k=TOP_K, device="cpu", dtype=torch.float32)
    model, _ = finetune.random_base(settings)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules()) == 4 * 7
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_finetune.py"), "--random-weights", "--method", "qlora",
         "--model", str(folder), "--top-k", "2", "--steps", "3", "--warmup", "1", "--n-train", "16", "--n-test", "4",
         "--n-replay", "4", "--batch-size", "4", "--out", str(tmp_path / "out.json")],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "NOTE: random weights" in done.stdout and "\nRESULT task_acc_before=" in done.stdout
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["settings"]["method"] == "qlora" and report["random_weights"] is True
    assert 0.9 < report["step_mem_predicted_mb"] / report["step_mem_measured_mb"] < 1.1


def test_stripped_wheel_keeps_a_valid_record_and_installs(tmp_path):
    wheel = tmp_path / "src" / "demo-1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    files = {"demo/__init__.py": b"VALUE = 1\n", "demo/libdemo_cuda130.so": b"\x7fELF130",
             "demo/libdemo_cuda118.so": b"\x7fELF118" * 1000,
             "demo-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo\nVersion: 1.0\n",
             "demo-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    with zipfile.ZipFile(wheel, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr("demo-1.0.dist-info/RECORD", "".join(f"{n},,\n" for n in files) + "demo-1.0.dist-info/RECORD,,\n")
    out = tmp_path / "out"
    out.mkdir()
    stripped = gpu_bundle.strip_wheel(wheel, out, {"libdemo_cuda130.so"}.__contains__)
    with zipfile.ZipFile(stripped) as z:
        names = set(z.namelist())
        record = z.read("demo-1.0.dist-info/RECORD").decode().splitlines()
    assert "demo/libdemo_cuda118.so" not in names and "demo/libdemo_cuda130.so" in names
    for row in record[:-1]:
        name, digest, size = row.split(",")
        assert digest == gpu_bundle._record_hash(files[name]) and int(size) == len(files[name])
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--target",
                           str(tmp_path / "site"), str(stripped)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "site" / "demo" / "libdemo_cuda130.so").is_file()


def test_gguf_halves_join_only_with_the_right_checksum(tmp_path):
    data = bytes(range(256)) * 100
    (tmp_path / "part1").write_bytes(data[:12000])
    (tmp_path / "part2").write_bytes(data[12000:])
    digest = hashlib.sha256(data).hexdigest()
    parts = [tmp_path / "part1", tmp_path / "part2"]
    joined = bench_gpu.join_gguf(parts, digest, tmp_path)
    assert joined.read_bytes() == data
    with pytest.raises(ValueError, match="out of order"):
        bench_gpu.join_gguf(parts[::-1], digest, tmp_path)
    with pytest.raises(FileNotFoundError, match="carry both halves"):
        bench_gpu.join_gguf([parts[0], tmp_path / "part3"], digest, tmp_path)


# --- Python 3.12 and 3.13 ------------------------------------------------------------------------------------------


def test_pinned_stack_has_binary_wheels_for_python_312_and_313(tmp_path):
    """pip resolves every pin of constraints.txt (the whole environment) to a binary wheel for CPython 3.12 and 3.13 on
    Linux x86-64, without installing anything (`--dry-run`, `--python-version`); needs PyPI, skips without it. Both
    run at once: they wait on the network, not the processor."""
    import urllib.request

    try:
        urllib.request.urlopen("https://pypi.org/simple/pip/", timeout=10).close()
    except OSError as error:
        pytest.skip(f"PyPI is not reachable from here ({error}): the pins for 3.12/3.13 cannot be checked")
    pins = [line.split("#")[0].strip() for line in (ROOT / "constraints.txt").read_text().splitlines()]
    requirements = tmp_path / "pins.txt"
    requirements.write_text("\n".join(p for p in pins if "==" in p) + "\n")
    platforms = [f"--platform=manylinux_2_{n}_x86_64" for n in (17, 24, 27, 28, 31, 34, 35)]
    runs = {}
    for version in ("3.12", "3.13"):
        report = tmp_path / f"report-{version}.json"
        runs[version] = (report, subprocess.Popen(
            [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-deps",
             "--only-binary=:all:", f"--python-version={version}", "--implementation=cp", *platforms,
             "--platform=manylinux2014_x86_64", "--platform=linux_x86_64", "--target", str(tmp_path / "none"),
             "--disable-pip-version-check", "-q", "--report", str(report), "-r", str(requirements)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    for version, (report, process) in runs.items():
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"Python {version}: {err[-2000:]}"
        installed = {item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"]
                     for item in json.loads(report.read_text())["install"]}
        assert len(installed) == len(requirements.read_text().split()), version
        assert all(item["download_info"]["url"].endswith(".whl")
                   for item in json.loads(report.read_text())["install"]), version
