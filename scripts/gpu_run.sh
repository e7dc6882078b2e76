#!/usr/bin/env bash
# One part of the GPU speed measurement (docs/gpu.md), on a machine that has torch and CUDA but no
# package registry: installs .gpu-kit's wheels (`make gpu-kit`) beside the image's packages, runs the
# part with --out results/speed (so each file's header names a command that runs from the repo
# root), and copies what it wrote to $OUT, which the device tool brings back.
#
#   scripts/gpu_run.sh essential|check|stack|others|bridge|compiled|profile|profile-compiled [more arguments]
#
# essential: what fits one call of a 15-minute device budget (docs/gpu.md): versions, bandwidth and
#           matmul rate, then 28 steps, ratios 2,4,6, 2 repeats: eager FORA, ToCa, TeaCache, compiled
#           full compute and FORA (regions, recompiles, graph breaks), then eager LearniBridge with
#           its fit time (calibrate_s); the arguments go to both benchmarks
# check:    versions, the device's copy bandwidth and bf16 matmul rate, every code path on flux-tiny
#           (the profile's too), and `lbridge sample runtime.compile=true` on the tiny model
# stack:    eager FORA, TaylorSeer, FoCa, L2P, TCC at ratios 2-6
# others:   eager ToCa, TeaCache, FirstBlockCache, MagCache
# bridge:   eager LearniBridge and its LoRA fit time per ratio (calibrate_s; ~5 min at flux-dev: its own call)
# compiled: regional torch.compile of full compute, FORA, ToCa, LearniBridge
# profile:  ms per CACHED call vs its FLOPs share (profile_cached_step.py), eager (ToCa also with its
#           blocks under their modules' hooks: toca:fused_blocks=false) with each call's matrix
#           products timed alone (--gemms), then FORA and ToCa with modulation=batched, then ToCa's
#           module by module; profile-compiled: compiled (FORA and ToCa also with modulation=batched)
# Files are copied to $OUT as they are written (every MIRROR_S seconds), not only at the end: the
# device tool kills a command at its time limit and brings back what $OUT holds then, so a part cut
# short still hands back the rows its script had written (bench_speed.py rewrites its csv after every row).
# Environment: PYTHON (python3), DEVICE (cuda), CONFIG (flux-dev), OUT (a temporary folder),
# RESULTS (results/speed: where the scripts write), COMPILE_BACKEND (inductor: check's `lbridge sample`),
# MIRROR_S (5), KIT (.gpu-kit: the folder of wheels to install; empty, or the default folder not
# there: the installed packages are used; tests set it empty, so what a local `make gpu-kit` leaves
# does not change what they run; any other path that is not a folder is refused).
set -euo pipefail
part=${1:?usage: scripts/gpu_run.sh essential|check|stack|others|bridge|compiled|profile|profile-compiled [arguments]}
shift
case $part in
  essential | check | stack | others | bridge | compiled | profile | profile-compiled) ;;
  *) echo "unknown part '$part' (accepted: essential, check, stack, others, bridge, compiled, profile, profile-compiled)" >&2
     exit 2 ;;
esac
PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
CONFIG=${CONFIG:-flux-dev}
OUT=${OUT:-$(mktemp -d)}

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
KIT=${KIT-.gpu-kit}
if [ -n "$KIT" ] && [ "$KIT" != .gpu-kit ] && [ ! -d "$KIT" ]; then
  echo "KIT=$KIT is not a folder: give the folder 'make gpu-kit' fills (.gpu-kit), or KIT= for the installed packages" >&2
  exit 2
fi
if [ -n "$KIT" ] && [ -d "$KIT" ]; then
  wheels=("$KIT"/*.whl)
  if [ ! -e "${wheels[0]}" ]; then
    echo "KIT=$KIT holds no wheels: run 'make gpu-kit' (docs/gpu.md), or KIT= for the installed packages" >&2
    exit 2
  fi
  kit=$(mktemp -d)
  "$PYTHON" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --target "$kit" "${wheels[@]}"
  export PYTHONPATH="$kit:$PYTHONPATH"
fi
if ! "$PYTHON" -c "import diffusers, hydra" 2>/dev/null; then
  echo "$PYTHON cannot import diffusers and hydra: run 'make gpu-kit' and carry .gpu-kit (docs/gpu.md)" >&2
  exit 2
fi
stem=$("$PYTHON" -c "import torch; from lbridge.bench.device import file_stem; print(file_stem(torch.device('$DEVICE'), '$CONFIG'))")
results=${RESULTS:-results/speed}
mkdir -p "$results"
before=$(mktemp)
touch "$before"
sleep 1  # files written from here on are newer than $before
mkdir -p "$OUT"

# Copy the files written since $before that changed since their last copy into $OUT, each through a
# temporary name and a rename, so $OUT never holds half a file (the scripts' own temporaries, named
# '.*', are left out).
handed_back() {
  local f name
  while IFS= read -r f; do
    name=$(basename "$f")
    if [ ! -e "$OUT/$name" ] || [ "$f" -nt "$OUT/$name" ]; then
      cp -p "$f" "$OUT/.$name.part" && mv -f "$OUT/.$name.part" "$OUT/$name"
    fi
  done < <(find "$results" -maxdepth 1 -type f -newer "$before" ! -name '.*')
}
# At the end, failed or not: the last copy (a part that fails after some rows hands those back too).
finish() {
  kill "$mirror" 2>/dev/null || true
  wait "$mirror" 2>/dev/null || true
  handed_back
  echo "written to $OUT:" && ls "$OUT"
}
(while sleep "${MIRROR_S:-5}"; do handed_back; done) &
mirror=$!
trap finish EXIT

# modulation=batched where the config's family has a step embedding to batch (not Wan, whose
# modulation runs once per call outside the blocks): elsewhere the profile would stop at it.
batched_profile() {
  if "$PYTHON" -c "import sys; from lbridge.bench.models import CONFIGS, batches_modulation as b; sys.exit(not b(CONFIGS[sys.argv[1]]))" "$CONFIG"; then
    profile --modulation batched "$@"
  else
    echo "modulation=batched: not for $CONFIG (its family computes its modulation once per call): skipped"
  fi
}
bench() { "$PYTHON" scripts/bench_speed.py --device "$DEVICE" --config "$CONFIG" --out "$results" "$@"; }
profile() { "$PYTHON" scripts/profile_cached_step.py --device "$DEVICE" --config "$CONFIG" --out "$results" "$@"; }
# Versions, and on CUDA the device's name, memory, copy bandwidth and bf16 matmul rate (a few seconds).
device_info() {
    "$PYTHON" - "$DEVICE" <<'EOF'
import sys, time, torch, diffusers, hydra
device = torch.device(sys.argv[1])
print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, hydra {hydra.__version__}, device {device}")
if device.type == "cuda":
    print(torch.cuda.get_device_name(device), f"{torch.cuda.get_device_properties(device).total_memory / 2**30:.0f} GiB")
    def seconds(fn, n=10):
        fn(); torch.cuda.synchronize(); t = time.perf_counter()
        for _ in range(n): fn()
        torch.cuda.synchronize(); return (time.perf_counter() - t) / n
    x = torch.randn(2**29, device=device, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    print(f"copy: {2 * x.nbytes / seconds(lambda: y.copy_(x)) / 1e12:.2f} TB/s (read + write)")
    a, b = (torch.randn(8192, 8192, device=device, dtype=torch.bfloat16) for _ in range(2))
    print(f"bf16 matmul 8192^3: {2 * 8192**3 / seconds(lambda: a @ b) / 1e12:.0f} TFLOP/s")
EOF
}

case $part in
  essential)
    device_info
    # Rows in the order they matter, each handed back as it is written: a call cut at its limit
    # loses the last ones. Fewer steps and ratios than the other parts, so that both fit one call.
    trimmed=(--ratios 2,4,6 --repeats 2 --steps 28)
    bench --methods fora,toca,teacache --compile-methods fora --no-calibrate "${trimmed[@]}" \
      --name "$stem-essential" "$@"
    bench --methods learnibridge --no-compile "${trimmed[@]}" --name "$stem-essential-bridge" "$@" ;;
  check)
    device_info
    bench --config flux-tiny --methods fora,toca,learnibridge --ratios 2 --repeats 1 \
      --compile-methods toca,learnibridge --calib-prompts 1 --calib-steps 5 --name "$stem-check" "$@"
    # The profile's paths on the device, matrix products timed alone included (the profile part's).
    profile --config flux-tiny --methods fora,toca --runs 1 --gemms --name "$stem-check-profile"
    # The command line on the device: `lbridge sample` with ToCa's sites compiled under its hooks
    # (it prints the graphs built while timed: 0), on the embedded tiny model.
    samples=$(mktemp -d)
    "$PYTHON" -m lbridge.cli sample model=tiny model.device="$DEVICE" method=toca ratio=3 num_prompts=2 \
      runtime.compile=true runtime.compile_backend="${COMPILE_BACKEND:-inductor}" output_root="$samples"
    rm -rf "$samples"
    ;;
  stack)
    bench --methods fora,taylorseer,foca,l2p,tcc --no-compile --no-calibrate --name "$stem-stack" "$@" ;;
  others)
    bench --methods toca,teacache,fbcache,magcache --no-compile --name "$stem-others" "$@" ;;
  bridge)
    bench --methods learnibridge --no-compile --name "$stem-bridge" "$@" ;;
  compiled)
    bench --methods "" --compile-methods fora,toca,learnibridge --no-calibrate --name "$stem-compiled" "$@" ;;
  profile)
    profile --methods fora,toca,toca:fused_blocks=false,learnibridge,fbcache --runs 3 --gemms "$@"
    batched_profile --methods fora,toca --runs 3 "$@"
    profile --methods toca --runs 3 --modules "$@" ;;
  profile-compiled)
    profile --methods fora,toca,learnibridge,fbcache --runs 3 --compile "$@"
    batched_profile --methods fora,toca --runs 3 --compile "$@" ;;
esac
