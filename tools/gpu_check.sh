#!/usr/bin/env bash
# Checks of the megatron trainer + LoRA on megatron-core's real CUDA paths (cpu_compat is inactive
# when CUDA is present). Run from anywhere, on a machine with a CUDA GPU:
#
#   bash tools/gpu_check.sh                      # all parts, logs under /tmp/gpu_check
#   OUT=/tmp/my_check PARTS=12 bash tools/gpu_check.sh
#
# Needs: python3 (or PY=/path/to/python) with CUDA torch, transformers, peft, safetensors, numpy,
# pytest and megatron-core 0.16.1, e.g. the project installed with `make setup` (then
# PY=.venv/bin/python) or `pip install -e '.[test]'`. Ray is not needed. The repository root is put
# on PYTHONPATH by the script, and PY may be relative to it. On a machine without network: when
# megatron-core is not importable and .whl/ holds wheels (e.g. `pip download --no-deps -d .whl
# megatron-core==0.16.1` run elsewhere for the same Python and platform), they are installed into
# /tmp/site first.
#
# Environment: OUT (log directory, default /tmp/gpu_check), PARTS (which parts to run, default 123),
# PY (the python to use, default python3).
#
# Parts:
#   1. slime_plugins/lora/test_lora.py                 (the LoRA self-check, on CUDA)
#   2. inline CUDA checks (HF logits parity, export round trip, PEFT parity, LoRA training,
#      bf16 step, checkpoint save/resume, NCCL grad-norm reduction)
#   3. pytest subset for one GPU (actor train step on packed batches, HF loading/errors and logits
#      parity, LoRA layer units, input recompute, the LoRA optimizer contents, PEFT export
#      parity), -x; left out: TP=2 / PP=2 (two GPUs) and SmolLM2 (needs the prepared model)
#
# Prints: GPU and library versions, a header per part with the elapsed seconds, one "ok"/"FAIL"
# line per inline check, pytest's summary, and last "gpu_check: PASSED in N s" (or FAILED). The
# same output goes to $OUT/log, pytest's to $OUT/pytest.log. Exit status: 0 when every part run
# passed, 1 when one failed, 3 when installing .whl/ failed, 4 when the imports failed.
set -o pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
cd "$(dirname "$0")/.." || exit 2
main() {
start=$(date +%s)
PY=${PY:-python3}
if ! $PY -c 'import megatron.core' 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 3
    export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
else
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TRANSFORMERS_VERBOSITY=error
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
$PY -c 'import torch, megatron.core as m, transformers, peft; print("torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-", "| megatron-core", m.__version__, "| transformers", transformers.__version__, "| peft", peft.__version__)' || return 4

status=0
part() { echo; echo "=== $1 ($(( $(date +%s) - start )) s)"; }
want() { [[ "${PARTS:-123}" == *"$1"* ]]; }

part "1. slime_plugins/lora/test_lora.py"
if want 1; then $PY slime_plugins/lora/test_lora.py || status=1; fi

part "2. inline CUDA checks"
if want 2; then $PY - <<'EOF' || status=1
import sys, tempfile, time, warnings
from pathlib import Path
warnings.filterwarnings("ignore")
import torch

from slime.backends.megatron_utils import hf_convert as hc
from slime.backends.megatron_utils.arch import ModelArch
from slime.backends.megatron_utils.parallel import gather_vocab
from slime.backends.megatron_utils.model import get_model, initialize_model_and_optimizer
from slime.backends.megatron_utils.parallel import init_parallel
from slime.utils.arguments import parse_args
from tests._support.dist import free_port
from tests._support.tiny_models import TINY_SHAPES, make_tiny_checkpoint

failed = []
def check(what, ok, detail=""):
    print(f"{'ok  ' if ok else 'FAIL'}  {what} {detail}", flush=True)
    if not ok:
        failed.append(what)

cuda = torch.cuda.is_available()
print("cuda available:", cuda, "| cpu_compat active:", not cuda)
if cuda:  # whether a CPU accumulator can take CUDA norms in this torch (informational)
    try:
        acc = torch.zeros((), dtype=torch.float64); acc += torch.ones((), device="cuda", dtype=torch.float64)
        print("note: CPU += CUDA 0-dim worked here")
    except RuntimeError as exc:
        print("note: CPU += CUDA 0-dim fails:", str(exc).splitlines()[0])
init_parallel(0, 1, master_port=free_port())
import torch.distributed as dist
print("process group backend:", dist.get_backend())
root = Path(tempfile.mkdtemp(prefix="gpu_check_"))
shapes = {s.name: s for s in TINY_SHAPES}
g = torch.Generator().manual_seed(1)
ids_cpu = torch.randint(0, 96, (2, 10), generator=g)

def build(path, *flags):
    args = parse_args(["--hf-checkpoint", str(path), *flags])
    arch = ModelArch.from_checkpoint(path)
    chunks = get_model(args, arch, args.lora)
    hc.load_hf_weights(chunks, arch, path)
    for c in chunks:
        c.eval()
    return chunks, arch, args

@torch.no_grad()
def our_logits(chunks, arch, ids):
    dev = next(chunks[0].parameters()).device
    ids = ids.to(dev)
    pos = torch.arange(ids.shape[1], device=dev).expand_as(ids)
    return gather_vocab(chunks[0](ids, pos, None), arch.vocab_size).float().cpu()

@torch.no_grad()
def hf_logits(path, ids):
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(ids).logits

# (a) every tiny shape: HF logits parity in fp32 and exact export round trip
from safetensors.torch import load_file
for name, shape in shapes.items():
    path = shape.make(root)
    chunks, arch, _ = build(path)
    dev = next(chunks[0].parameters()).device
    diff = (our_logits(chunks, arch, ids_cpu) - hf_logits(path, ids_cpu)).abs().max().item()
    check(f"[{name}] logits == transformers (fp32, device {dev})", diff < 1e-4, f"max diff {diff:.2e}")
    exported = hc.export_hf_weights(chunks, arch)
    expected = load_file(str(path / "model.safetensors"))
    same = exported.keys() == expected.keys() and all(torch.equal(exported[k], expected[k]) for k in expected)
    check(f"[{name}] export_hf_weights round trip is exact (CPU tensors)", same and all(t.device.type == "cpu" for t in exported.values()))

# (b) LoRA: our adapter export loads into peft and gives the same log-probs; import back is exact
from peft import PeftModel
from transformers import AutoModelForCausalLM
from slime_plugins.lora.peft_io import load_peft_adapter, save_peft_adapter
from slime_plugins.lora.lora_layer import lora_modules
base = root / "qwen3-gqa2-headdim"
lora_flags = ["--use-lora", "--lora-r", "4", "--lora-alpha", "8"]
chunks, arch, args = build(base, *lora_flags)
with torch.no_grad():
    gen = torch.Generator().manual_seed(0)
    for _, layer in lora_modules(chunks[0]):
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen) * 0.3)
ours = our_logits(chunks, arch, ids_cpu)
save_peft_adapter(chunks, arch, args.lora, root / "adapter", str(base))
with torch.no_grad():
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), root / "adapter").eval()
    theirs = peft_model(ids_cpu).logits
diff = (ours - theirs).abs().max().item()
check("LoRA model (B random) == peft on our exported adapter", diff < 1e-4, f"max diff {diff:.2e}")
chunks2, _, args2 = build(base, *lora_flags)
load_peft_adapter(chunks2, arch, root / "adapter", args2.lora)
diff = (our_logits(chunks2, arch, ids_cpu) - ours).abs().max().item()
check("adapter import into a fresh model is exact", diff == 0.0, f"max diff {diff:.2e}")

# (c) LoRA training on the GPU: loss falls, only adapters move, optimizer state on the GPU,
#     grad norm (NCCL-safe accumulator) finite
def train_steps(built, steps, ids):
    model, opt = built.model[0], built.optimizer
    model.train()
    dev = next(model.parameters()).device
    ids = ids.to(dev)
    pos = torch.arange(ids.shape[1] - 1, device=dev).expand(ids.shape[0], -1)
    out = []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(ids[:, :-1], pos, None, labels=ids[:, 1:]).float().mean()
        loss.backward()
        norm, lr = opt.step()
        out.append((loss.item(), norm, lr))
    return out

train_flags = ["--hf-checkpoint", str(base), *lora_flags, "--lr", "5e-2", "--seed", "3"]
torch.manual_seed(0)
built = initialize_model_and_optimizer(parse_args(train_flags))
frozen = {n: p.detach().clone() for n, p in built.model[0].named_parameters() if not p.requires_grad}
steps = train_steps(built, 4, ids_cpu)
print("  steps (loss, grad_norm, lr):", [(round(l, 4), round(g, 4), lr) for l, g, lr in steps])
check("LoRA training lowers the loss", steps[-1][0] < steps[0][0])
check("grad norms finite and > 0", all(torch.isfinite(torch.tensor(g)) and g > 0 for _, g, _ in steps))
check("frozen base bitwise unchanged",
      all(torch.equal(p, frozen[n]) for n, p in built.model[0].named_parameters() if not p.requires_grad))
devs = {v.device.type for st in built.optimizer.optimizer.state.values() for k, v in st.items() if k != "step" and torch.is_tensor(v)}
check("AdamW state lives on the parameters' device", devs == {next(built.model[0].parameters()).device.type}, str(devs))

# (d) checkpoint: save after 2 steps, resume into a fresh model, step 3 identical
from slime.backends.megatron_utils.checkpoint import load_checkpoint, save_checkpoint
import numpy as np, random
def seeded_build():
    random.seed(0); np.random.seed(0); torch.manual_seed(0)
    a = parse_args(train_flags + ["--lora-dropout", "0.1"])
    return a, initialize_model_and_optimizer(a)
a1, b1 = seeded_build()
train_steps(b1, 2, ids_cpu)
save_checkpoint(root / "ckpt", 2, b1.model, b1.arch, a1, b1.optimizer, {"consumed": 4})
step3 = train_steps(b1, 1, ids_cpu)[0]
a2, b2 = seeded_build()
it, extra = load_checkpoint(root / "ckpt", b2.model, b2.arch, a2, b2.optimizer)
resumed = train_steps(b2, 1, ids_cpu)[0]
check("checkpoint resume: iteration and extra state", it == 2 and extra == {"consumed": 4})
close = all(abs(x - y) <= 1e-6 * max(1.0, abs(y)) for x, y in zip(resumed, step3))
check("checkpoint resume: step 3 (loss, grad norm, lr) equal to 1e-6 (dropout 0.1: RNG restored)", close,
      f"bitwise={resumed == step3} {resumed} vs {step3}")

# (e) bf16 LoRA step on the GPU
try:
    torch.manual_seed(0)
    bb = initialize_model_and_optimizer(parse_args(train_flags + ["--bf16"]))
    dt = {(p.requires_grad, p.dtype) for p in bb.model[0].parameters()}
    print("  bf16 build (trainable, dtype):", sorted(map(str, dt)))
    s = train_steps(bb, 2, ids_cpu)
except Exception as exc:  # report and go on
    import traceback; traceback.print_exc()
    dt, s = set(), [(float("nan"), float("nan"), 0.0)]
check("bf16 LoRA: base params bf16, 2 steps finite", (False, torch.bfloat16) in dt and all(np.isfinite(l) and np.isfinite(g) for l, g, _ in s),
      f"{[(round(l, 4), round(g, 4)) for l, g, _ in s]}")
if cuda:
    print(f"  peak CUDA memory {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
print("inline checks:", "FAILED " + str(failed) if failed else "all passed")
sys.exit(1 if failed else 0)
EOF
fi

part "3. pytest subset (must pass on CUDA)"
if want 3; then $PY -m pytest -x -q -p no:cacheprovider -W ignore \
    tests/backends/megatron_utils/test_actor.py \
    tests/slime_plugins/lora/test_lora_layer.py \
    tests/slime_plugins/lora/test_input_recompute.py \
    "tests/backends/megatron_utils/test_hf_convert.py" \
    tests/slime_plugins/lora/test_megatron_lora_hook.py::test_optimizer_holds_exactly_the_lora_parameters_and_base_is_untouched \
    tests/slime_plugins/lora/test_peft_io.py::test_export_matches_peft_and_round_trips \
    -k "not tp2 and not pp2 and not smollm2" \
    2>&1 | tee "$OUT/pytest.log" || status=1; fi

part "done"
nvidia-smi --query-gpu=name,memory.used --format=csv 2>/dev/null
echo "gpu_check: $([ $status = 0 ] && echo PASSED || echo FAILED) in $(( $(date +%s) - start )) s"
return $status
}
main 2>&1 | tee "$OUT/log"
